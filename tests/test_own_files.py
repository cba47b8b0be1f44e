"""A checkpoint's files are its own (issue 41, item 1): a symbolic link, a device, a FIFO or an odd name in a
checkpoint folder is refused naming it, before anything is read through it; no manifest covers one; a GGUF named
through a link is refused; and nothing of a link's target reaches the cache. Small folders written by hand: no
model loads."""
import json
import os
import signal
from pathlib import Path

import pytest

from quantgate import checkpoint
from quantgate.files import foreign_entries, manifest
from quantgate.sources import DownloadError, gguf_path, parse_source

SECRET = b"hf_quantgateFAKEsecret0123456789fromELSEWHERE"
OWN = "a checkpoint's files must be its own regular files"


def download_step():
    """tasks.download's download(); found by its definition where a refactor moved it."""
    try:
        from tasks.download import download
    except ImportError:  # pragma: no cover - only while tasks/ is being rearranged
        import importlib
        import pkgutil

        import tasks
        for info in pkgutil.iter_modules(tasks.__path__):
            module = importlib.import_module(f"tasks.{info.name}")
            if callable(getattr(module, "download", None)):
                return module.download
        raise
    return download


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file elsewhere on the host, holding something that must never reach a run, the cache or the registry."""
    path = tmp_path / "elsewhere" / "hf_token"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    return path


def tiny_checkpoint(folder: Path) -> Path:
    """A whole checkpoint that checkpoint.problems passes: a config, a word-level tokenizer, one small tensor."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "<unk>"}))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 3, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}))
    save_file({"model.embed_tokens.weight": torch.zeros(3, 8)}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    return folder


def holding(root: Path, data: bytes) -> list[Path]:
    """Every regular file under root whose bytes contain `data` (links not followed)."""
    return [Path(d) / f for d, _, files in os.walk(root) for f in files
            if (Path(d) / f).is_file() and not (Path(d) / f).is_symlink() and data in (Path(d) / f).read_bytes()]


# ---------------------------------------------------------------- (a) foreign_entries

def test_a_link_to_a_file_outside_is_named_with_its_target(tmp_path, secret):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "processor_config.json").symlink_to(secret)
    assert foreign_entries(folder) == [
        f"processor_config.json: a symbolic link to {secret}, outside the checkpoint folder; {OWN}"]


def test_a_link_inside_a_fifo_and_a_linked_folder_are_refused_too(tmp_path, secret):
    folder = tmp_path / "ckpt"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "alias.json").symlink_to("../config.json")  # relative, and inside: still a link
    os.mkfifo(folder / "sub" / "pipe")
    (folder / "linked").symlink_to(secret.parent, target_is_directory=True)  # a folder elsewhere: not walked
    assert foreign_entries(folder) == [
        f"linked: a symbolic link to {secret.parent}, outside the checkpoint folder; {OWN}",
        f"sub/alias.json: a symbolic link to ../config.json, inside the checkpoint folder; {OWN}",
        f"sub/pipe: a FIFO; {OWN}",
    ]


def test_odd_names_are_refused_and_letters_of_any_script_kept(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "модель.json", "模型-v1.txt", "tokenizer\nconfig.json", "a\\b.json", "x\u202e.json"):
        (folder / name).write_text("{}")
    found = foreign_entries(folder)
    assert [line.split(":")[0] for line in found] == ["a\\\\b.json", "tokenizer\\nconfig.json", "x\\u202e.json"]
    assert all("a name with odd characters" in line for line in found)


def test_the_folder_itself_may_be_a_link_to_a_clean_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    assert foreign_entries(tmp_path / "alias") == []
    assert [f["path"] for f in manifest(tmp_path / "alias")] == ["config.json"]


# ---------------------------------------------------------------- (b) checkpoint.problems

def test_problems_name_the_link_first_and_read_nothing(tmp_path, secret, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "chat_template.jinja").symlink_to(secret)
    opened = []
    for name in ("_config", "_tokenizer", "safetensors_problem"):
        monkeypatch.setattr(checkpoint, name, lambda *a, _n=name: opened.append(_n))
    found = checkpoint.problems(folder)
    assert found == [f"{folder}/chat_template.jinja: a symbolic link to {secret}, outside the checkpoint folder; {OWN}"]
    assert opened == []  # nothing was parsed: the refusal came before the config, tokenizer and weights
    (folder / "chat_template.jinja").unlink()
    assert checkpoint.problems(folder)[0] == f"{folder}: no *.safetensors weights"  # the usual checks, once clean
    assert opened == ["_config", "_tokenizer"]


# ---------------------------------------------------------------- (c) manifest

def test_manifest_refuses_a_folder_holding_a_link(tmp_path, secret):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert [f["path"] for f in manifest(folder)] == ["config.json"]
    (folder / "chat_template.jinja").symlink_to(secret)
    with pytest.raises(ValueError, match=r"chat_template\.jinja: a symbolic link to .*hf_token, outside") as e:
        manifest(folder)
    assert SECRET.decode() not in str(e.value)


# ---------------------------------------------------------------- (d) gguf:PATH

def test_a_gguf_named_through_a_link_is_refused(tmp_path):
    real = tmp_path / "real.gguf"
    real.write_bytes(b"GGUF" + bytes(60))
    assert gguf_path(parse_source(f"gguf:{real}"), tmp_path) == real
    link = tmp_path / "model.gguf"
    link.symlink_to(real)
    source = parse_source(f"gguf:{link}")
    assert source.ref == str(link) and source.revision is None  # kept as a link, not resolved and hashed
    with pytest.raises(DownloadError, match=f"^{link}: a symbolic link to {real}; a GGUF must be a regular file"):
        gguf_path(source, tmp_path)


def test_a_gguf_that_is_a_fifo_is_refused_without_reading_it(tmp_path):
    pipe = tmp_path / "pipe.gguf"
    os.mkfifo(pipe)
    signal.alarm(20)  # reading a FIFO with no writer would block: fail instead of hanging
    try:
        with pytest.raises(DownloadError, match=f"^{pipe}: a FIFO; a GGUF must be a regular file"):
            gguf_path(parse_source(f"gguf:{pipe}"), tmp_path)
    finally:
        signal.alarm(0)


# ---------------------------------------------------------------- (e) the download step, end to end

def test_download_refuses_a_local_checkpoint_with_a_link_and_caches_nothing_of_it(tmp_path, secret):
    download = download_step()
    folder = tiny_checkpoint(tmp_path / "mine")
    (folder / "processor_config.json").symlink_to(secret)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match=f"{folder}/processor_config.json: a symbolic link to {secret}, "
                                            "outside the checkpoint folder"):
        download(str(folder), None, str(cache), "bfloat16")
    assert holding(cache, SECRET) == [] and holding(cache, b"hf_quantgate") == []
    # The same folder without the link is a checkpoint the step takes: the link alone was refused.
    (folder / "processor_config.json").unlink()
    result = download(str(folder), None, str(cache), "bfloat16")
    digest = result["checkpoint_sha256"] if isinstance(result, dict) else result.checkpoint_sha256  # dict or Downloaded
    assert len(digest) == 64


def test_a_link_added_after_a_clean_download_is_refused_on_the_next(tmp_path, secret):
    download = download_step()
    folder = tiny_checkpoint(tmp_path / "mine")
    cache = tmp_path / "cache"
    download(str(folder), None, str(cache), "bfloat16")
    (folder / "processor_config.json").symlink_to(secret)
    with pytest.raises(DownloadError, match="processor_config.json: a symbolic link"):
        download(str(folder), None, str(cache), "bfloat16")


def test_a_hub_cache_snapshot_is_refused_with_a_hint(tmp_path):
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc123"
    blobs = tmp_path / "models--org--name" / "blobs"
    snapshot.mkdir(parents=True), blobs.mkdir()
    (blobs / "e3b0c442").write_text("{}")
    (snapshot / "config.json").symlink_to("../../blobs/e3b0c442")
    assert foreign_entries(snapshot) == [
        f"config.json: a symbolic link to ../../blobs/e3b0c442, outside the checkpoint folder; {OWN} (a Hugging Face "
        "cache snapshot: name it as hf:ORG/NAME, or download it with --local-dir)"]
