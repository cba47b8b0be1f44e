"""Batch-1 int4 matrix-vector products on the Gemma-3-12B shapes, kernel by kernel (docs/BENCHMARKS.md):
bf16 against torchao's int4 packings (tile_packed_to_4d = tinygemm; preshuffled and plain = mslk),
GemLite's A16W4 (hqq's `gemlite` backend: 4-bit codes, bf16 scale and zero per group of 64, `gemlite64`)
and the Triton study kernel over tinygemm's bytes (docs/gpu/int4_gemv.py), over its launch
configurations. Each shape is replayed from a CUDA graph over enough weight copies to exceed L2, as
a decode step reads them; one JSON line per (shape, kernel) with the median time and bytes per second.
  python docs/gpu/int4_kernels.py      (PACKINGS="bf16 tile_packed_to_4d preshuffled plain gemlite64 triton")"""
import itertools
import json
import os
import sys
from pathlib import Path

import torch
from torchao.quantization import Int4WeightOnlyConfig, quantize_

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import graph_us  # noqa: E402
from int4_gemv import int4_gemv, launch_config  # noqa: E402

from quantgate.modeling import real_bytes  # noqa: E402

# (name, out_features, in_features) of one Gemma 3 12B decoder layer; q/k/v and gate/up fused.
SHAPES = [("qkv", 8192, 3840), ("o", 3840, 4096), ("gate_up", 30720, 3840), ("down", 3840, 15360)]
LAYERS = 48
PACKINGS = os.environ.get("PACKINGS", "bf16 tile_packed_to_4d triton").split()
SWEEP = os.environ.get("SWEEP") == "1"  # every launch configuration of the Triton kernel, not only the default


def gemlite_a16w4(linear: torch.nn.Linear, group: int):
    """The Linear as GemLite's A16W4 layer, its weights rounded to 4-bit codes with a scale and zero per group as
    HQQ stores them (W = (code - zero) * scale), without HQQ's optimisation of the zeros."""
    from gemlite.helper import A16W4_HQQ_INT

    n, k = linear.weight.shape
    w = linear.weight.detach().float().view(n, k // group, group)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-8) / 15
    zero = -low / scale
    codes = (w / scale + zero).round().clamp(0, 15).to(torch.uint8).view(n, k)
    return A16W4_HQQ_INT(device="cuda", dtype=torch.bfloat16).from_weights(
        codes, scale.view(n, -1).bfloat16(), zero.view(n, -1).bfloat16())


def linears(out_features: int, in_features: int, packing: str, copies: int) -> tuple[list, torch.Tensor]:
    """`copies` Linears in the packing, and the first one's bf16 weight before quantizing."""
    made = [torch.nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16, device="cuda")
            for _ in range(copies)]
    original = made[0].weight.detach().clone()
    if packing.startswith("gemlite"):
        return [gemlite_a16w4(linear, int(packing[len("gemlite"):])) for linear in made], original
    if packing != "bf16":
        for linear in made:
            quantize_(linear, Int4WeightOnlyConfig(group_size=128, int4_packing_format=packing))
    return made, original


@torch.no_grad()
def time_shape(name: str, n: int, k: int, packing: str) -> list[dict]:
    copies = max(2, min(LAYERS, (400 << 20) // (n * k // 2) + 1))
    mods, original = linears(n, k, packing if packing != "triton" else "tile_packed_to_4d", copies)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    exact = torch.nn.functional.linear(x, original).float()
    rel = lambda y: round(((y.float() - exact).norm() / exact.norm()).item(), 5)  # noqa: E731
    base = {"shape": name, "n": n, "k": k, "packing": packing, "copies": copies}
    if packing != "triton":
        us = graph_us([lambda m=m: m(x) for m in mods], copies)
        # GemLite's layer keeps its packed codes and per-group scales and zeros as buffers: what one call reads.
        read = real_bytes(mods[0]) if not packing.startswith("gemlite") else \
            sum(t.numel() * t.element_size() for t in (mods[0].W_q, mods[0].scales, mods[0].zeros))
        return [{**base, "us": round(us, 2), "bytes": read, "gb_s": round(read / us / 1e3, 1),
                 "rel_err_vs_bf16": rel(mods[0](x))}]
    tinygemm = mods[0](x).float()
    weights = [m.weight for m in mods]
    # What the kernel reads: the unpadded k-tiles of qdata and the groups of scale_and_zero they use.
    read = n * k // 2 + (k // 128) * n * 4
    default = launch_config(weights[0].qdata.shape[0] * 8, -(-k // 128))
    configs = [default]
    if SWEEP:
        configs += [c for c in itertools.product((16, 32, 64, 128), (1, 2, 4), (1, 2, 4, 8), (4, 8))
                    if c != default and (c[3] == 4 or c[0] >= 64)]
    rows = []
    for config in configs:
        run = lambda w, c=config: int4_gemv(x, w.qdata, w.scale_and_zero, 128, k, n, c)  # noqa: E731
        try:
            y = run(weights[0]).float()
            us = graph_us([lambda w=w: run(w) for w in weights], copies)
        except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported, others go on
            rows.append({**base, "config": config, "error": repr(e)[:200]})
            continue
        rows.append({**base, "config": config, "default": config == default, "us": round(us, 2), "bytes": read,
                     "gb_s": round(read / us / 1e3, 1), "rel_err_vs_bf16": rel(y),
                     "rel_diff_vs_tinygemm": round(((y - tinygemm).norm() / tinygemm.norm()).item(), 5)})
    return rows


def main() -> None:
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name()}), flush=True)
    total = {}
    for packing in PACKINGS:
        for name, n, k in SHAPES:
            try:
                rows = time_shape(name, n, k, packing)
            except Exception as e:  # noqa: BLE001 - reported, then the other packings still run
                rows = [{"shape": name, "packing": packing, "error": repr(e)[:400]}]
            for row in rows:
                print(json.dumps(row), flush=True)
            timed = [r for r in rows if "us" in r]
            picks = {packing: timed} if packing != "triton" else \
                {"triton default": [r for r in timed if r["default"]], "triton best": timed}
            for key, pick in picks.items():
                if pick:
                    total[key] = total.get(key, 0.0) + min(r["us"] for r in pick) * LAYERS / 1000
            torch.cuda.empty_cache()
    print(json.dumps({"ms_per_token_in_layer_linears": {p: round(v, 3) for p, v in total.items()}}), flush=True)


if __name__ == "__main__":
    main()
