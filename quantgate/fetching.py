"""Fetching a model source (quantgate.sources) into a verified safetensors checkpoint folder.

Every checkpoint gets a manifest (files, sizes, sha256, source, revision). A GGUF is converted
once into a bf16/fp16/fp32 safetensors checkpoint with its tokenizer and chat template; later
runs reuse it after checking the hashes, and convert again when a file is missing or damaged.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import re
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from quantgate import checkpoint
from quantgate.files import foreign_entries, manifest, sha256_file, sha256_files, write_json
from quantgate.formats import error_line
from quantgate.sources import HUB_PATTERNS, PACKAGED_GGUF, DownloadError, Source, gguf_path, parse_source
from quantgate.runlog import SHOWN

log = logging.getLogger("quantgate.download")


# ---------------------------------------------------------------- manifests

def checkpoint_dir(source: Source, cache_dir: Path) -> Path:
    """Where the checkpoint of a source lives once fetched (a local folder is its own)."""
    if source.kind == "local":
        return Path(source.ref)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.ref if source.kind != "gguf" else Path(source.ref).name)
    return cache_dir / "checkpoints" / f"{source.kind}--{slug}@{source.revision or 'none'}"


def manifest_path(source: Source, cache_dir: Path) -> Path:
    if source.kind == "local":  # never write into the user's own folder
        slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.ref.strip("/"))
        return cache_dir / "manifests" / f"{slug}.json"
    return checkpoint_dir(source, cache_dir) / "manifest.json"


def write_manifest(folder: Path, manifest_file: Path, source: Source, extra: dict) -> dict:
    files = manifest(folder, exclude=(manifest_file,))
    record = {"source": source.text, "revision": source.revision,
              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files, **extra}
    record["checkpoint_sha256"] = hashlib.sha256("".join(f["path"] + f["sha256"] for f in files).encode()).hexdigest()
    manifest_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(manifest_file, record)
    return record


def check_manifest(folder: Path, manifest_file: Path, only: str | None = None) -> list[str]:
    """Problems with a checkpoint folder against its manifest (with `only`, that one file of it); empty when intact."""
    if not manifest_file.is_file():
        return [f"{manifest_file}: missing"]
    problems, entries = [], json.loads(manifest_file.read_text())["files"]
    if only is not None:
        entries = [e for e in entries if e["path"] == only]
        if not entries:
            return [f"{folder / only}: not in the manifest"]
    sized = [p for e in entries if (p := folder / e["path"]).is_file() and p.stat().st_size == e["bytes"]]
    digests = dict(zip(sized, sha256_files(sized)))  # all at once, then named in the manifest's order
    for entry in entries:
        path = folder / entry["path"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (size := path.stat().st_size) != entry["bytes"]:
            what = "truncated" if size < entry["bytes"] else "grown"
            problems.append(f"{path}: {size} bytes, the manifest says {entry['bytes']} bytes ({what})")
        elif (digests.get(path) or sha256_file(path)) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted)")
    return problems


def intact(source: Source, cache_dir: Path) -> list[str]:
    return check_manifest(checkpoint_dir(source, cache_dir), manifest_path(source, cache_dir))


# ---------------------------------------------------------------- fetching

def convert_gguf(gguf: Path, out: Path, dtype: str, base_model: str | None) -> None:
    """Dequantize a GGUF into a safetensors checkpoint with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    with one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype))
    # The loaded model still carries its GGUF quantizer, which save_pretrained would follow;
    # the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if base_model:
        model.config._name_or_path = base_model
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("converted %s to safetensors in %.1f s", gguf.name, time.perf_counter() - t0, extra=SHOWN)


_GGUF_PATCH = threading.Lock()  # one conversion at a time patches gguf: overlapping, one would restore the other's


@contextlib.contextmanager
def one_gguf_reader():
    """transformers reads the GGUF's fields anew for the tokenizer, the config and the weights, each a GGUFReader
    building every token and merge as a Python object (20 s of Qwen2.5-Coder-0.5B's 46 s): while converting, a
    file is read once and its reader (read-only, memory-mapped) handed to all three."""
    import gguf

    with _GGUF_PATCH:
        real, readers = gguf.GGUFReader, {}

        def reader(path, mode="r"):
            key = (str(Path(path).resolve()), mode)
            if key not in readers:
                readers[key] = real(path, mode)
            return readers[key]

        gguf.GGUFReader = reader
        try:
            yield readers
        finally:
            gguf.GGUFReader = real


def fetch_hub(source: Source, out: Path) -> str:
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()  # reads HF_TOKEN from the environment, for gated repos
    commit = api.model_info(source.ref, revision=source.revision).sha
    snapshot_download(source.ref, revision=commit, local_dir=out, allow_patterns=HUB_PATTERNS)
    shutil.rmtree(out / ".cache", ignore_errors=True)  # huggingface_hub's bookkeeping
    return commit


def fetch(source: Source, cache_dir: Path, dtype: str) -> None:
    """Fetch or convert into the cache: a temp folder, renamed into place when complete."""
    if source.kind == "local":
        if not (Path(source.ref) / "config.json").is_file():
            raise DownloadError(f"{source.ref}: not a checkpoint folder (no config.json)")
        if found := checkpoint.problems(Path(source.ref)):  # refused before any model loads from it
            raise DownloadError("the local checkpoint is refused: " + "; ".join(found))
        write_manifest(Path(source.ref), manifest_path(source, cache_dir), source, {})
        return
    target = checkpoint_dir(source, cache_dir)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    extra = {}
    if source.kind == "hf":
        extra["commit"] = fetch_hub(source, tmp)
    else:
        gguf = gguf_path(source, cache_dir)
        info = PACKAGED_GGUF.get(source.ref, {})
        convert_gguf(gguf, tmp, dtype, info.get("base_model"))
        extra.update(converted_from=str(gguf), gguf_sha256=sha256_file(gguf), dtype=dtype,
                     base_model=info.get("base_model"), license=info.get("license"))
    if found := checkpoint.problems(tmp):
        raise DownloadError(f"{source.text}: what was fetched is damaged: " + "; ".join(found))
    write_manifest(tmp, tmp / "manifest.json", source, extra)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def fetched(source: str, revision: str | None, cache_dir: str, dtype: str) -> dict:
    """The source's checkpoint in the cache (fetched or converted where it is missing or damaged) and its manifest's
    facts."""
    src = parse_source(source, revision)
    cache = Path(cache_dir)
    # Every time, not only when the manifest differs: a link added after a clean download changes no hash.
    if (folder := checkpoint_dir(src, cache)).is_dir() and (found := foreign_entries(folder)):
        raise DownloadError("the checkpoint is refused: " + "; ".join(f"{folder}/{line}" for line in found))
    problems = intact(src, cache)
    if problems:
        log.info("fetching %s: %s", src.text, problems[0], extra=SHOWN)
        fetch(src, cache, dtype)
    manifest = json.loads(manifest_path(src, cache).read_text())
    return {"checkpoint": str(checkpoint_dir(src, cache)), "source": src.text, "revision": src.revision,
            "checkpoint_sha256": manifest["checkpoint_sha256"],
            "base_model": manifest.get("base_model"), "license": manifest.get("license")}


# ---------------------------------------------------------------- configs

def read_model_config(source: Source, cache_dir: Path):
    """The model's transformers config, without loading any weights (for plans). A GGUF's is read from its
    conversion in the cache where there is one (what the download step uses while it is intact), since transformers
    otherwise parses every tokenizer field of the GGUF to find it (2.3 of `quantgate plan`'s 9.7 s on SmolLM2)."""
    from transformers import AutoConfig

    if source.kind == "hf":
        from huggingface_hub import hf_hub_download
        try:
            config_file = hf_hub_download(source.ref, "config.json", revision=source.revision)
        except Exception as e:  # offline, gated, missing: all end the plan with the Hub's own words
            raise DownloadError(f"{source.text}@{source.revision}: could not read config.json from the Hub: "
                                f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
        return AutoConfig.from_pretrained(Path(config_file).parent)
    if source.kind in ("pypi", "gguf"):
        path = gguf_path(source, cache_dir)
        if (converted := converted_config(source, cache_dir)) is not None:
            return AutoConfig.from_pretrained(converted.parent)
        stat = path.stat()  # a gguf: source's revision is its content's hash; a package's, its version
        return copy.deepcopy(gguf_config(str(path), source.revision, stat.st_size, stat.st_mtime_ns))
    if not (Path(source.ref) / "config.json").is_file():
        raise DownloadError(f"{source.ref}: not a checkpoint folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(source.ref)
    except Exception as e:  # not JSON, an unknown model_type, ...
        raise DownloadError(f"{Path(source.ref) / 'config.json'}: transformers cannot read it: {error_line(e)}") from None


@functools.lru_cache(maxsize=4)
def gguf_config(path: str, revision: str | None, size: int, mtime_ns: int):
    """A GGUF's config as transformers reads it, once a process for the file as it is (its revision, size and
    time)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(Path(path).parent, gguf_file=Path(path).name)


def converted_config(source: Source, cache_dir: Path) -> Path | None:
    """The config.json of a source's conversion in the cache, where the manifest lists it with these very bytes;
    None otherwise (not converted yet, or damaged: the download step converts it again)."""
    config = checkpoint_dir(source, cache_dir) / "config.json"
    try:
        problems = check_manifest(config.parent, manifest_path(source, cache_dir), only=config.name)
    except (OSError, ValueError, KeyError, TypeError):  # a damaged manifest: the download step converts again
        return None
    return None if problems or config.is_symlink() else config
