"""Writing files so that a reader never sees half of one, names that become folders, the sha256
manifest of a folder, and whether a folder's files are its own."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import unicodedata
from concurrent.futures import ThreadPoolExecutor
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


def sha256_files(paths: list[Path]) -> list[str]:
    """Each file's sha256, a thread a core: hashlib lets go of the GIL while it hashes, so a checkpoint's shards hash
    at once (docs/BENCHMARKS.md, "Hashing a checkpoint's shards at once")."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), len(os.sched_getaffinity(0))))) as pool:
        return list(pool.map(sha256_file, paths))


# A name's characters that no checkpoint file needs: control and format characters (a newline, an escape, a
# right-to-left override), line and paragraph separators, lone surrogates (bytes that are not UTF-8 on a Linux
# filesystem), and the backslash. Letters of any script are fine.
ODD_CATEGORIES = {"Cc", "Cf", "Cs", "Zl", "Zp"}
OWN = "a checkpoint's files must be its own regular files"
# A Hugging Face cache snapshot is a folder of links into ../../blobs: the one common folder of links.
HUB_CACHE_HINT = " (a Hugging Face cache snapshot: name it as hf:ORG/NAME, or download it with --local-dir)"


def _odd(c: str) -> bool:
    return c == "\\" or unicodedata.category(c) in ODD_CATEGORIES


def shown(name: str) -> str:
    """A name or link target for a message: each odd character escaped (\\n, \\x1b, \\u202e, \\udcff), letters kept."""
    return "".join(ascii(c)[1:-1] if _odd(c) else c for c in name)


def kind_of(mode: int) -> str:
    """What an lstat mode is, in words."""
    kinds = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a regular file"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((words for test, words in kinds if test(mode)), f"not a regular file (mode {oct(mode)})")


def foreign_entries(folder: Path) -> list[str]:
    """Every entry under `folder` that is not a regular file or folder of its own, one line each, named relative to
    `folder`: a symbolic link (inside or outside the folder: a link is refused, never followed), a device, FIFO or
    socket, a name with odd characters. `folder` itself may be a link to a folder (it is resolved once); nothing
    below it may be. Empty when every entry is its own."""
    root = Path(folder).resolve()
    if not root.is_dir():
        return [f"{folder}: not a folder"]
    found, folders = [], [root]
    while folders:  # a stack, not recursion: no folder is nested too deep to check
        here = folders.pop()
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError as e:
            found.append(f"{shown(str(here.relative_to(root)))}: cannot be listed ({error_line(e)}); {OWN}")
            continue
        for entry in entries:
            path = Path(entry.path)
            name = shown(str(path.relative_to(root)))
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    target = os.readlink(path)
                    where = "inside" if Path(os.path.realpath(path)).is_relative_to(root) else "outside"
                    hint = HUB_CACHE_HINT if "blobs/" in target else ""
                    found.append(f"{name}: a symbolic link to {shown(target)}, {where} the checkpoint folder; {OWN}"
                                 + hint)
                    continue
            except OSError as e:  # gone or unreadable while we looked
                found.append(f"{name}: cannot be read ({error_line(e)}); {OWN}")
                continue
            if any(map(_odd, entry.name)):
                found.append(f"{name}: a name with odd characters (control or format characters, a backslash, bytes "
                             f"that are not UTF-8); {OWN}")
            elif stat.S_ISDIR(mode):
                folders.append(path)
            elif not stat.S_ISREG(mode):
                found.append(f"{name}: {kind_of(mode)}; {OWN}")
    return sorted(found)


def manifest(folder: Path, exclude: tuple[Path, ...] = ()) -> list[dict]:
    """Every file under `folder` (but `exclude`), sorted, with its size and sha256; a ValueError naming them where
    the folder holds a link, a device or an odd name (foreign_entries): no manifest covers a file not its own."""
    if found := foreign_entries(folder):
        raise ValueError(f"{folder}: " + "; ".join(found))
    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and p not in exclude]
    return [{"path": str(p.relative_to(folder)), "bytes": p.stat().st_size, "sha256": digest}
            for p, digest in zip(files, sha256_files(files))]


def save_tensors(path: Path, stats) -> Path:
    """Tensors in plain containers written atomically (cached_tensors reads them back), the folder made."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(stats, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, buffer.getvalue())


def cached_tensors(path: Path):
    """A cached file of tensors in plain containers, read as data only (a pickle planted in a shared cache runs
    no code); None, with a warning, where it does not load as such: the caller measures it again."""
    import torch

    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # an UnpicklingError for anything but data, a truncated file, ...
        log.warning("cached %s does not load as data (%s): measuring it again", path, error_line(e))
        return None
