"""Writing files so that a reader never sees half of one, names that become folders, and the sha256
manifest of a folder."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from quantgate.formats import error_line

WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt")  # transformers', older transformers', hqq's

log = logging.getLogger("quantgate.files")

# Recipe and model names become folders in a run, the registry and Hub repo names.
SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")


def slug(name: str) -> str:
    """`name` if it is safe as one path segment; a ValueError saying what is allowed otherwise."""
    if not SLUG.fullmatch(name) or ".." in name:
        raise ValueError(f"{name!r} is not a safe name: allowed are letters, digits, '.', '_' and '-', starting "
                         "with a letter or digit, at most 96 characters, no '..'")
    return name


def under(root: Path, *parts: str) -> Path:
    """root/parts, refused if it would land outside root (a name holding '../' or an absolute path)."""
    root = Path(root).resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{path} is outside {root}")
    return path


def write_atomic(path: Path, data: str | bytes) -> Path:
    """A temporary file beside `path`, then a rename: a reader sees the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    tmp.replace(path)
    return path


def write_json(path: Path, data) -> Path:
    return write_atomic(path, json.dumps(data, indent=2, default=str))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: Path, exclude: tuple[Path, ...] = ()) -> list[dict]:
    """Every file under `folder` (but `exclude`), sorted, with its size and sha256."""
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(Path(folder).rglob("*")) if p.is_file() and p not in exclude]


def cached_tensors(path: Path):
    """A cached file of tensors in plain containers, read as data only (a pickle planted in a shared cache runs
    no code); None, with a warning, where it does not load as such: the caller measures it again."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # an UnpicklingError for anything but data, a truncated file, ...
        log.warning("cached %s does not load as data (%s): measuring it again", path, error_line(e))
        return None
