"""Issue 39, the decode step outside the weight matmuls: the benchmark's step (StaticDecoder: one decoder layer
compiled per layer type, fused projections, math attention, CUDA graph) against the same step with its attention over
the static cache cut, each variant compiled afresh in one process and timed as the benchmark times it (a warm-up run,
then the median of REPEATS runs of 256 new tokens after 256 prompt tokens), the variants alternating over ROUNDS; each
variant's compiled step also profiled without its graph (PROFILE_STEPS steps), kernels grouped.
  python docs/gpu/decode_cut.py CKPT_DIR reference|RECIPE     (one JSON line per variant and round)
Variants (VARIANTS, default "base pack pack-bf16"):
  base       the benchmark's step as it is: under torch.compile transformers' SDPA wrapper expands K and V from the 8 KV
             heads to all 16 (repeat_kv), and the math formula converts them to float32 first: a float32 copy of twice
             the cache, every layer, every token;
  pack       transformers' own pack_gqa for one query token (which it skips under torch.compile only): the 16 query
             heads folded onto the 8 KV heads as 2 query rows each, the cache read as it is;
  pack-bf16  pack, and the math formula left in bf16 (torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp: the
             matmuls still accumulate in float32; no float32 copy of the cache).
  bf16       the float32 copy dropped, repeat_kv kept.
Nothing of quantgate is changed: the variants patch transformers' module and torch's flag while they compile and run.
Inductor's FX-graph and AOTAutograd caches are off here: they do not key on torch's flag, and in the first H100 run
(docs/gpu/output/h100-39-cut-g3.jsonl, caches on) `pack-bf16` and `bf16` reused the compiles of `pack` and `base` made
earlier in the same process (the same kernels, float32 ones included, compiled in 0.5-0.9 s)."""
import contextlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import transformers.integrations.sdpa_attention as sdpa_module  # noqa: E402

from quantgate.backends import backend_of  # noqa: E402
from quantgate.bench.decode import StaticDecoder, decode_attention, decode_eager, prompt_ids  # noqa: E402
from quantgate.bench.fusion import fuse_projections  # noqa: E402
from quantgate.bench.worker import Spec, loader  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.settings import BenchmarkSettings  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda")
torch._inductor.config.fx_graph_cache = False  # each variant compiled afresh (see the docstring)
torch._functorch.config.enable_autograd_cache = False
PROMPT, NEW = int(os.environ.get("PROMPT", 256)), int(os.environ.get("NEW", 256))
REPEATS, ROUNDS = int(os.environ.get("REPEATS", 5)), int(os.environ.get("ROUNDS", 2))
PROFILE_STEPS = int(os.environ.get("PROFILE_STEPS", 10))
CHECK = int(os.environ.get("CHECK", 64))  # tokens compared with eager decoding
COMPILE = os.environ.get("COMPILE") == "1"  # DEVICE=cpu COMPILE=1: a dry run that compiles (no graph, no profile)


@contextlib.contextmanager
def variant(name: str):
    compiling, reduction = sdpa_module.is_torchdynamo_compiling, torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    try:
        if name.startswith("pack"):
            sdpa_module.is_torchdynamo_compiling = lambda: False  # only its pack_gqa branch reads it there
        if name.endswith("bf16"):
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
        yield
    finally:
        sdpa_module.is_torchdynamo_compiling = compiling
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(reduction)


def group(name: str, us: float) -> str:
    """A kernel's part of the step, by its name (and, for cuBLAS kernels, its length: the smallest weight matmul,
    o_proj, takes over 10 us; attention's matmuls over a 512-slot cache take a few)."""
    n = name.lower()
    if "int4pack" in n or "tinygemm" in n:
        return "weight matmul"
    if "splitkreduce" in n:
        return "weight matmul (split-K reduce)"
    if any(k in n for k in ("nvjet", "gemm", "gemv", "cutlass", "sm90_xmma")) and "triton" not in n:
        return "weight matmul" if us >= 6 else "attention matmuls (cuBLAS)"
    if "memcpy" in n or "memset" in n:
        return "copies (memcpy/memset)"
    if "triton" in n:
        if "softmax" in n:
            return "attention softmax + mask"
        if "expand" in n or "clone" in n:
            return "attention K/V expand (+float32)"
        if "index_copy" in n or re.search(r"_(cos|sin|neg)_", n):
            return "q/k norm, rotary, cache write"
        if "rsqrt" in n:
            return "RMSNorm (+residual)"
        if "gelu" in n:
            return "MLP gelu*up"
        return "other triton"
    return "other (eager: embedding, argmax, ...)"


def profile(decoder, ids) -> dict:
    decoder.prefill(ids)
    for _ in range(2):
        decoder.step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILE_STEPS):
            decoder.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups = {}
    for e in kernels:
        us = e.time_range.elapsed_us()
        g = groups.setdefault(group(e.name, us), [0.0, 0])
        g[0] += us / PROFILE_STEPS
        g[1] += 1 / PROFILE_STEPS
    busy = sum(v[0] for v in groups.values())
    kernels.sort(key=lambda e: e.time_range.start)
    step = kernels[-len(kernels) // PROFILE_STEPS:]
    layer = step[len(step) // 2 - len(step) // 96: len(step) // 2 + len(step) // 96]  # about two layers mid-step
    return {"gpu_busy_ms": round(busy / 1000, 3), "kernels_per_step": round(len(kernels) / PROFILE_STEPS, 1),
            "groups": {k: {"ms": round(v[0] / 1000, 4), "n": round(v[1], 1)}
                       for k, v in sorted(groups.items(), key=lambda kv: -kv[1][0])},
            "mid_step": [[round(e.time_range.elapsed_us(), 2), e.name[:110]] for e in layer]}


def run_variant(model, ids, name: str, eager_tokens, base_tokens) -> tuple[dict, torch.Tensor]:
    with variant(name), decode_attention("math"):
        torch._dynamo.reset()
        t0 = time.perf_counter()
        decoder = StaticDecoder(model, ids.shape[0], PROMPT + NEW, compiled=DEVICE == "cuda" or COMPILE,
                                graph=DEVICE == "cuda")
        compile_s = time.perf_counter() - t0
        profiled = profile(decoder, ids) if DEVICE == "cuda" and PROFILE_STEPS else {}
        if decoder.graph is None:  # a CPU dry run
            decoder.prefill(ids)
        decoder.run(ids, NEW)
        runs = [decoder.run(ids, NEW) for _ in range(REPEATS)]
    tokens = runs[-1][2]
    figures = [r[1] for r in runs]
    del decoder
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    return {"variant": name, "decode_ms_per_token": round(statistics.median(figures), 4),
            "decode_ms_all": [round(f, 4) for f in figures], "compile_s": round(compile_s, 1),
            "agreement_with_eager": float((tokens[:, :CHECK] == eager_tokens).float().mean()),
            "agreement_with_base": None if base_tokens is None else float((tokens == base_tokens).float().mean()),
            **profiled}, tokens


def main(checkpoint: str, name: str) -> None:
    recipe = None if name == "reference" else \
        load_config(ROOT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0].model_dump(mode="json")
    t0 = time.perf_counter()
    model = loader(Spec(checkpoint=checkpoint, recipe=recipe, mode="quantize_on_load" if recipe else "reference",
                        dtype="bfloat16", device=DEVICE, settings=BenchmarkSettings(), out_dir="/tmp"))()
    fused = fuse_projections(model, backend_of(recipe) if recipe else None)["fused"]
    ids = prompt_ids(model.get_input_embeddings().weight.shape[0], 1, PROMPT, torch.device(DEVICE))
    _, eager_ms, eager_tokens = decode_eager(model, ids, CHECK)
    print(json.dumps({"model": name, "fused": fused, "load_s": round(time.perf_counter() - t0, 1),
                      "eager_ms_per_token": round(eager_ms, 3),
                      "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
                      "torch": torch.__version__}), flush=True)
    base_tokens = None
    for r in range(ROUNDS):
        for v in os.environ.get("VARIANTS", "base pack pack-bf16").split():
            result, tokens = run_variant(model, ids, v, eager_tokens, base_tokens)
            print(json.dumps({"model": name, "round": r + 1, **result}), flush=True)
            if v == "base" and base_tokens is None:
                base_tokens = tokens


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
