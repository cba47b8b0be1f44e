"""Where a decode step's GPU time goes (docs/BENCHMARKS.md): the benchmark's compiled decode step
with fused projections, without the CUDA graph so that torch.profiler sees each kernel.
  python docs/gpu/profile_decode.py CKPT_DIR reference|RECIPE ...   (one JSON line per kernel group)"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402

from quantgate.backends import backend_of  # noqa: E402
from quantgate.bench.decode import StaticDecoder, decode_attention, prompt_ids  # noqa: E402
from quantgate.bench.fusion import fuse_projections  # noqa: E402
from quantgate.bench.worker import Spec, loader  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.settings import BenchmarkSettings  # noqa: E402

STEPS = 20
DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu: a dry run of this script (eager, nothing to profile)


def kind(name: str) -> str:
    n = name.lower()
    for key, label in (("int4pack", "int4 matmul (tinygemm)"), ("gemv", "gemv"), ("gemm", "gemm"), ("nvjet", "gemm"),
                       ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
                       ("triton", "inductor triton"), ("copy", "copy"), ("index", "index")):
        if key in n:
            return label
    return "other"


def profile(checkpoint: str, name: str) -> None:
    model = loaded(checkpoint, name)
    # SDPA: the benchmark's decode_attention (math, gqa, auto) or SDPBackend names, e.g. efficient_attention.
    with decode_attention(os.environ.get("SDPA", "gqa"), model):
        _profile(model, name)


def loaded(checkpoint: str, name: str):
    recipe = None if name == "reference" else \
        load_config(ROOT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0].model_dump(mode="json")
    model = loader(Spec(checkpoint=checkpoint, recipe=recipe, mode="quantize_on_load", dtype="bfloat16",
                        device=DEVICE, settings=BenchmarkSettings(), out_dir="/tmp"))()
    # The recipe's backend stacks its library's packed weights (torchao's int4), as the benchmark fuses them.
    fused = fuse_projections(model, backend_of(recipe) if recipe else None)["fused"]
    print(json.dumps({"model": name, "sdpa": os.environ.get("SDPA", "gqa"), "fused": fused}), flush=True)
    return model


def _profile(model, name: str) -> None:
    # AUTOTUNE_POINTWISE=1: as the six profiles of issue 19 ran (the step's default is off since).
    decoder = StaticDecoder(model, 1, 512, compiled=DEVICE == "cuda", graph=False,
                            autotune_pointwise=os.environ.get("AUTOTUNE_POINTWISE", "0") == "1")
    ids = prompt_ids(model.get_input_embeddings().weight.shape[0], 1, 256, torch.device(DEVICE))
    decoder.prefill(ids)
    t0 = time.perf_counter()
    for _ in range(3):
        decoder.step()
    torch.cuda.synchronize() if DEVICE == "cuda" else None
    print(json.dumps({"model": name, "compile_s": round(time.perf_counter() - t0, 1)}), flush=True)
    activity = torch.profiler.ProfilerActivity.CUDA if DEVICE == "cuda" else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        start = time.perf_counter()
        for _ in range(STEPS):
            decoder.step()
        torch.cuda.synchronize() if DEVICE == "cuda" else None
        wall_ms = (time.perf_counter() - start) * 1000 / STEPS
    groups, kernels = {}, []
    for event in prof.key_averages():
        us = (event.device_time_total if DEVICE == "cuda" else event.self_cpu_time_total) / STEPS
        if us <= 0:
            continue
        label = kind(event.key)
        g = groups.setdefault(label, {"us_per_step": 0.0, "kernels_per_step": 0.0})
        g["us_per_step"] += us
        g["kernels_per_step"] += event.count / STEPS
        kernels.append((us, event.count / STEPS, event.key[:90]))
    busy = sum(g["us_per_step"] for g in groups.values())
    print(json.dumps({"model": name, "wall_ms_per_step_no_graph": round(wall_ms, 3),
                      "gpu_busy_ms_per_step": round(busy / 1000, 3),
                      "kernels_per_step": round(sum(g["kernels_per_step"] for g in groups.values()), 1),
                      "groups": {k: {"ms": round(v["us_per_step"] / 1000, 3), "n": round(v["kernels_per_step"], 1)}
                                 for k, v in sorted(groups.items(), key=lambda kv: -kv[1]["us_per_step"])}}), flush=True)
    for us, count, key in sorted(kernels, reverse=True)[:14]:
        print(json.dumps({"model": name, "us_per_step": round(us, 1), "per_step": count, "kernel": key}), flush=True)
    if DEVICE == "cuda":
        # The last step's kernels in order, to see what runs between two matmuls of one layer.
        launched = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                          key=lambda e: e.time_range.start)
        step = launched[-len(launched) // STEPS:]
        out = Path(os.environ.get("OUT", "/tmp")) / f"profile-{name}-step{os.environ.get('PROCESS', '')}.jsonl"
        out.write_text("".join(json.dumps({"us": round(e.time_range.elapsed_us(), 2), "kernel": e.name[:120]}) + "\n"
                               for e in step))
        for e in step[len(step) // 2:len(step) // 2 + 2 * len(step) // 48]:  # two layers from the middle
            print(json.dumps({"model": name, "us": round(e.time_range.elapsed_us(), 2), "kernel": e.name[:100]}),
                  flush=True)
        # The same process's figure through the CUDA graph, as the benchmark measures it: does a process whose
        # kernels take longer also decode slower?
        decoder._warm_and_capture()
        figures = [decoder.run(ids, 256)[1] for _ in range(4)][1:]
        print(json.dumps({"model": name, "graph_decode_ms_per_token": round(statistics.median(figures), 4)}), flush=True)
    del decoder, model
    torch._dynamo.reset()
    torch.cuda.empty_cache()


if __name__ == "__main__":
    for model_name in sys.argv[2:]:
        profile(sys.argv[1], model_name)
