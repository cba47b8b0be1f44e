"""Whether a checkpoint folder on disk is whole, checked from its files' structure before any model loads:
a truncated or corrupted safetensors file, a shard the index names but the folder lacks, a config or
tokenizer that does not load, a file that is not its own (a symbolic link, a device, an odd name: those come
first, and nothing in the folder is read when there are any). Each problem names the file and what is wrong."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from quantgate.files import foreign_entries
from quantgate.formats import error_line

INDEX = "model.safetensors.index.json"


def safetensors_problem(path: Path) -> str | None:
    """What is wrong with a safetensors file's header and data extent, or None. The format: 8 bytes of header
    length (little-endian), a JSON header giving each tensor's [begin, end) in the data that follows."""
    size = path.stat().st_size
    if size < 8:
        return f"{path}: {size} bytes, too short for a safetensors header"
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if 8 + length > size:
            return f"{path}: its header says {length:,} bytes of header, the file holds {size - 8:,} after the length"
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            return f"{path}: the header is not valid JSON ({e})"
    ends = [t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"]
    needed, have = max(ends, default=0), size - 8 - length
    if needed > have:
        return f"{path}: truncated: its tensors need {needed:,} bytes of data, the file holds {have:,}"
    return None


def problems(folder: Path) -> list[str]:
    """Everything found wrong with a checkpoint folder; empty when it is whole. A folder holding a symbolic link
    (or a device, a FIFO, an odd name) is refused with those alone, before any of its files is opened: nothing is
    read through a link to a file elsewhere on the host."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: not a folder"]
    if foreign := foreign_entries(folder):
        return [f"{folder}/{line}" for line in foreign]
    found = []
    if (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            return [f"{folder / INDEX}: not a safetensors index ({type(e).__name__}: {e})"]
        found += [f"{folder / s}: missing (named by {INDEX})" for s in shards if not (folder / s).is_file()]
    weights = sorted(folder.glob("*.safetensors"))
    if not weights and not found:
        found.append(f"{folder}: no *.safetensors weights")
    found += [p for p in map(safetensors_problem, weights) if p]
    for what, load in (("config.json", _config), ("tokenizer", _tokenizer)):
        try:
            load(folder)
        except Exception as e:
            found.append(f"{folder}: the {what} does not load: {error_line(e)}")
    return found


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
