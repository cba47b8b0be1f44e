"""Writing files so that a reader never sees half of one, and the sha256 manifest of a folder."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


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
