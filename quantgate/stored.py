"""What a quantized checkpoint stores, read from its safetensors files before any forward: values no forward can make
right: NaN or Inf in a quantized module's weights, scales or zero points, and packed integer weights whose words all
hold one value. Zero or subnormal scales and FP8 blocks whose weights are all zero are noted, not failed: a block the
base holds as zeros, or as values too small for its scale (pruned), stores them too, and the forward judges them."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# How the libraries name a quantized module's tensors, after the module's name: the scale that multiplies the stored
# weight (transformers' FP8, compressed-tensors, torchao, quanto, LLM.int8(), bitsandbytes' double-quantized absmax),
# packed or integer weights, zero points. The longest suffix that matches names the role.
ROLES = {
    "weight_scale_inv": "scale", "weight_scale": "scale", "_weight_scale": "scale", "weight._scale": "scale",
    "SCB": "scale", "weight.nested_absmax": "scale", "weight_global_scale": "scale",
    "weight_packed": "packed", "qweight": "packed", "_weight_qdata": "packed", "weight._data": "packed",
    "weight_zero_point": "zero_point", "_weight_zero_point": "zero_point", "weight": "weight",
}
CHUNK = 1 << 24  # elements converted at a time: bounds the memory a check takes
SAME_WORDS_MIN = 64
# FP8's non-finite bit patterns: e4m3fn has NaN only (S.1111.111), e5m2 IEEE's all-ones exponent.
FP8_SPECIALS = {torch.float8_e4m3fn: (0x7F, 0x7F), torch.float8_e5m2: (0x7C, 0x7C)}
NOTED = {"zero", "subnormal", "all-zero blocks"}  # a packed tensor this large whose words are all equal was never written


def split(key: str) -> tuple[str, str, str] | None:
    """(module, tensor, role) for a tensor of a quantized module's kind, else None."""
    for suffix in sorted(ROLES, key=len, reverse=True):
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix, ROLES[suffix]
    return None


def _count(tensor: torch.Tensor, test) -> int:
    flat = tensor.reshape(-1)
    return sum(int(torch.count_nonzero(test(flat[i:i + CHUNK].float()))) for i in range(0, flat.numel(), CHUNK))


def _subnormal(x: torch.Tensor, tiny: float) -> torch.Tensor:
    return (x != 0) & (x.abs() < tiny)


def zero_blocks(weight: torch.Tensor, block: list[int]) -> int:
    """FP8 blocks of `block` rows and columns whose weights are all zero (either sign)."""
    rows, cols = weight.shape[-2:]
    bh, bw = block
    magnitude = weight.reshape(-1, rows, cols).view(torch.uint8) & 0x7F
    if rows % bh or cols % bw:  # edge blocks: padded with zeros, which change no block's maximum
        magnitude = torch.nn.functional.pad(magnitude, (0, -cols % bw, 0, -rows % bh))
    n, r, c = magnitude.shape
    return int(torch.count_nonzero(magnitude.reshape(n, r // bh, bh, c // bw, bw).amax(dim=(2, 4)) == 0))


def problems(tensor: torch.Tensor, role: str) -> list[tuple[str, int]]:
    """(problem, how many) for one stored tensor of a quantized module; those in NOTED fail nothing."""
    found = []
    if tensor.dtype in FP8_SPECIALS:  # read as bytes: NaN and Inf are bit patterns, no conversion needed
        mask, special = FP8_SPECIALS[tensor.dtype]
        found.append(("NaN or Inf", int(torch.count_nonzero((tensor.view(torch.uint8) & mask) == special))))
    elif tensor.is_floating_point():
        found.append(("NaN or Inf", _count(tensor, lambda x: ~torch.isfinite(x))))
        if role == "scale":
            tiny = torch.finfo(tensor.dtype).tiny
            found += [("zero", _count(tensor, lambda x: x == 0)),
                      ("subnormal", _count(tensor, lambda x: _subnormal(x, tiny)))]
    elif role in ("packed", "weight") and tensor.numel() >= SAME_WORDS_MIN:
        flat = tensor.reshape(-1)
        found.append(("one value in every word", tensor.numel() if bool((flat == flat[0]).all()) else 0))
    return [(problem, n) for problem, n in found if n]


def block_size(folder: Path) -> list[int] | None:
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    return (config.get("quantization_config") or {}).get("weight_block_size")


def scan(folder: Path) -> dict:
    """Every quantized module's stored tensors in a checkpoint folder's safetensors files: how many were read, and
    each finding with its module, tensor, problem and count."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return {"scanned": False, "why": f"no safetensors files in {folder} (the library saves another format)"}
    t0, block, seen = time.perf_counter(), block_size(Path(folder)), []
    keys = {}
    for file in files:
        with safe_open(file, "pt") as f:
            keys[file] = {key: parts for key in f.keys() if (parts := split(key))}
    # A module is quantized where it stores a scale or packed words; shards may split its tensors.
    quantized = {module for parts in keys.values() for module, _, role in parts.values() if role in ("scale", "packed")}
    for file, parts in keys.items():
        with safe_open(file, "pt") as f:
            for key, (module, name, role) in parts.items():
                if module not in quantized:
                    continue
                tensor = f.get_tensor(key)
                found = problems(tensor, role)
                if tensor.dtype in FP8_SPECIALS and block and tensor.dim() >= 2:
                    found.append(("all-zero blocks", zero_blocks(tensor, block)))
                seen += [{"module": module, "tensor": name, "problem": problem, "count": n} for problem, n in found if n]
    return {"scanned": True, "quantized_modules": len(quantized),
            "findings": [f for f in seen if f["problem"] not in NOTED], "notes": [f for f in seen if f["problem"] in NOTED],
            "seconds": round(time.perf_counter() - t0, 2)}


def finding_reason(scanned: dict) -> str:
    """The first finding, named, and how many more: the reason a checkpoint fails before any forward."""
    first, more = scanned["findings"][0], len(scanned["findings"]) - 1
    problem = ("all its words hold one value" if first["problem"] == "one value in every word"
               else f"{first['count']:,} {first['problem']} {'value' if first['count'] == 1 else 'values'}")
    text = f"{first['module']}'s stored {first['tensor']}: {problem}, before any forward"
    return text + (f" (and {more} more {'finding' if more == 1 else 'findings'})" if more else "")
