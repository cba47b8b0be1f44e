"""The decode step's attention alone, one query token over a static cache of the 12B shape (16 query heads, 8 KV heads,
head_dim 256, 512 slots, 384 of them filled), per layer as a step sees it: each formula compiled, called over 48
layers' caches (past L2), replayed from a CUDA graph (issue 39: the attention's two cuBLAS products and its softmax
were 0.45 of the 1.2 ms a step spends outside the weight matmuls on the H100).
  python docs/gpu/attention_variants.py        (one JSON line per formula; DEVICE=cpu: the numerics alone, no timing)
Formulas: gqa, the benchmark's (quantgate/bench/attention.py: Q K^T and P V as matmuls, which inductor leaves to cuBLAS);
reduce, the same products as broadcast multiplies summed in float32, which inductor writes as its own reductions and
may fuse with the softmax; math, SDPA's math formula with the KV heads repeated (what transformers does under compile)."""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from graph_timing import graph_us  # noqa: E402

from quantgate.bench.attention import gqa_decode_attention  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda")
LAYERS, HEADS, KV_HEADS, DIM, SLOTS, FILLED = 48, 16, 8, 256, 512, 384


def gqa(query, key, value, mask):
    return gqa_decode_attention(None, query, key, value, mask)[0]


def reduce(query, key, value, mask):
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    rows = (query * dim ** -0.5).reshape(batch, kv_heads, heads // kv_heads, 1, dim)
    scores = (rows.float() * key.unsqueeze(2).float()).sum(-1)  # (b, kv_heads, groups, slots)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    out = (probs.unsqueeze(-1) * value.unsqueeze(2).float()).sum(-2)  # (b, kv_heads, groups, dim)
    return out.to(value.dtype).reshape(batch, heads, 1, dim).transpose(1, 2)


def math(query, key, value, mask):
    groups = query.shape[1] // key.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=mask)
    return out.transpose(1, 2)


def inputs():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    query = torch.randn(LAYERS, 1, HEADS, 1, DIM, device=DEVICE, dtype=dtype)
    key = torch.randn(LAYERS, 1, KV_HEADS, SLOTS, DIM, device=DEVICE, dtype=dtype)
    value = torch.randn(LAYERS, 1, KV_HEADS, SLOTS, DIM, device=DEVICE, dtype=dtype)
    mask = (torch.arange(SLOTS, device=DEVICE) < FILLED).reshape(1, 1, 1, SLOTS)
    return query, key, value, mask


def main() -> None:
    query, key, value, mask = inputs()
    exact = math(query[0].float(), key[0].float(), value[0].float(), mask)
    for name, formula in (("gqa", gqa), ("reduce", reduce), ("math", math)):
        error = (formula(query[0], key[0], value[0], mask).float() - exact).abs().max().item()
        found = {"formula": name, "max_abs_error_vs_float32": round(error, 5)}
        if DEVICE == "cuda":
            compiled = torch.compile(formula, fullgraph=True, dynamic=False)
            calls = [lambda i=i: compiled(query[i], key[i], value[i], mask) for i in range(LAYERS)]
            found["us_per_layer"] = round(graph_us(calls, LAYERS), 2)
            found["ms_per_step_48_layers"] = round(found["us_per_layer"] * LAYERS / 1000, 3)
        print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
