"""Block-FP8 (128x128) matrix products on the Gemma-3-12B layer shapes, one token and a prompt's worth, kernel by
kernel (docs/BENCHMARKS.md): bf16, torch's block-scaled FP8 matmul as quantgate's fp8 backend calls it on a Hopper
GPU (the activations' quantization included), and quantgate's reference kernel. Each shape is replayed from a CUDA
graph over enough weight copies to exceed L2, as a decode step reads them; one JSON line per (shape, rows, kernel)
with the median time, bytes per second and the relative difference from the reference's product.
  python docs/gpu/fp8_kernels.py"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import graph_us  # noqa: E402
from quantgate.backends import fp8_kernel  # noqa: E402

# (name, out_features, in_features) of one Gemma 3 12B decoder layer; q/k/v and gate/up fused, as the benchmark runs them.
SHAPES = [("qkv", 8192, 3840), ("o", 3840, 4096), ("gate_up", 30720, 3840), ("down", 3840, 15360)]
LAYERS = 48


def fp8_weights(n: int, k: int, copies: int) -> list[tuple]:
    """Block-FP8 weights and their scales as the checkpoint holds them, laid out as the backend's load leaves them."""
    made = []
    for _ in range(copies):
        w = torch.randn(n, k, device="cuda") * 0.02
        blocks = w.unflatten(1, (k // 128, 128)).unflatten(0, (n // 128, 128))
        scale = blocks.abs().amax((1, 3)) / fp8_kernel.FP8_MAX
        codes = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).flatten(2).flatten(0, 1)
        layer = torch.nn.Module()
        layer.weight, layer.weight_scale_inv, layer.block_size = codes, torch.nn.Parameter(scale), (128, 128)
        fp8_kernel.lay_out_scales(layer)
        made.append((codes, layer.weight_scale_inv.data))
    return made


@torch.no_grad()
def time_shape(name: str, n: int, k: int, rows: int) -> list[dict]:
    copies = max(2, min(LAYERS, (400 << 20) // (n * k) + 1))
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    weights = fp8_weights(n, k, copies)
    reference = fp8_kernel._product(x, fp8_kernel.dequantize_weight(*weights[0], (128, 128)), (128, 128))
    base, out = {"shape": name, "n": n, "k": k, "rows": rows, "copies": copies}, []
    kernels = {"scaled_mm": lambda w, s: fp8_kernel.blockwise_matmul(x, w, s, torch.bfloat16),
               "reference": lambda w, s: fp8_kernel._product(x, fp8_kernel.dequantize_weight(w, s, (128, 128)),
                                                             (128, 128)).bfloat16()}
    for kernel, call in kernels.items():
        timed = weights if kernel == "scaled_mm" else weights[:2]  # the reference's float32 copies: two are enough
        us = graph_us([lambda w=w, s=s: call(w, s) for w, s in timed], len(timed))
        read = n * k + weights[0][1].numel() * 4
        diff = ((call(*weights[0]).float() - reference).norm() / reference.norm()).item()
        out.append({**base, "kernel": kernel, "us": round(us, 2), "bytes": read, "gb_s": round(read / us / 1e3, 1),
                    "rel_diff_vs_reference": round(diff, 6)})
    del weights
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(max(2, copies // 2))]
    us = graph_us([lambda w=w: torch.nn.functional.linear(x, w) for w in bf16], len(bf16))
    out.append({**base, "kernel": "bf16", "us": round(us, 2), "bytes": n * k * 2, "gb_s": round(n * k * 2 / us / 1e3, 1)})
    return out


def main() -> None:
    fp8_kernel.install()
    runs = fp8_kernel.probe(torch.device("cuda"))
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(),
                      "block_scaled_matmul": runs}), flush=True)
    if not runs:
        return
    total: dict = {}
    for rows in (1, 256):
        for shape in SHAPES:
            for row in time_shape(*shape, rows):
                print(json.dumps(row), flush=True)
                key = f"{row['kernel']} rows={rows}"
                total[key] = total.get(key, 0.0) + row["us"] * LAYERS / 1000
            torch.cuda.empty_cache()
    print(json.dumps({"ms_per_token_in_layer_linears": {k: round(v, 3) for k, v in total.items()}}), flush=True)


if __name__ == "__main__":
    main()
