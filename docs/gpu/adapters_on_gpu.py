"""Issue 38 on the GPU: a LoRA served on the recipes that need CUDA (torchao int4, float8-dynamic) and on
bitsandbytes' int8 and nf4, gated as the flow gates it. SmolLM2 from its GGUF, a LoRA trained here (tests/lora.py:
8 steps on WikiText-2), the reference with and without it measured once (tasks/reference.py), then per recipe the
quantize step, the adapters step (drift against the reference with the adapter, what survives of its effect,
merge/unmerge and reload) and the benchmark step with the adapter on top (which decode path it got). One JSON line
per recipe. DEVICE=cpu RECIPES="torchao-int8-weight-only": a dry run on a CPU.
  python docs/gpu/adapters_on_gpu.py GGUF_PATH"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from quantgate import modeling  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.settings import AdapterSpec, BenchmarkSettings, ValidateSettings  # noqa: E402
from tasks.adapters import check_adapters  # noqa: E402
from tasks.benchmark import benchmark  # noqa: E402
from tasks.download import download  # noqa: E402
from tasks.quantize import quantize  # noqa: E402
from tasks.reference import adapter_or_error, measure_validation  # noqa: E402
from tests.lora import train_lora  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda")
RECIPES = os.environ.get("RECIPES", "torchao-int4-weight-only torchao-float8-dynamic bnb-int8 bnb-nf4").split()
WORK = Path(os.environ.get("WORK", tempfile.mkdtemp(prefix="adapters-")))


def emit(**row) -> None:
    print(json.dumps(row, default=str), flush=True)


def main(gguf: str) -> None:
    emit(torch=torch.__version__, device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu")
    cache = WORK / "cache"
    base = download(f"gguf:{gguf}", None, str(cache), "bfloat16")
    t0 = time.perf_counter()
    lora = train_lora(Path(base.checkpoint), WORK / "lora", log=lambda step, loss: emit(lora_step=step, loss=round(loss, 3)))
    emit(lora_trained_s=round(time.perf_counter() - t0, 1))
    validate = ValidateSettings(generate_prompts=1, max_new_tokens=8, long_context=None)
    compute = modeling.compute_dtype("bfloat16", DEVICE)
    model = modeling.load(base.checkpoint, compute, modeling.resolve_device(DEVICE))
    tokenizer = AutoTokenizer.from_pretrained(base.checkpoint)
    measured = measure_validation(model, tokenizer, base, compute, "bfloat16", cache, validate)
    adapted = adapter_or_error(model, tokenizer, AdapterSpec(name="wiki", source=str(lora)), measured, cache, validate,
                               "bfloat16")
    emit(reference_adapter={k: adapted.get(k) for k in ("effect", "error", "r", "target_modules")})
    del model
    torch.cuda.empty_cache() if DEVICE == "cuda" else None
    bench = BenchmarkSettings(prompt_tokens=64, new_tokens=32, repeats=2)  # no memory_budget: no KV-cache search
    reference = benchmark("reference", base.checkpoint, None, "bfloat16", DEVICE, bench, str(WORK / "reference"))
    for name in RECIPES:
        recipe = load_config(ROOT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]
        out = WORK / name
        quantized = quantize(base.checkpoint, recipe, "bfloat16", DEVICE, str(out), 0.95, str(cache), str(WORK / "registry"))
        if not quantized.ok:
            emit(recipe=name, quantize=quantized.status, reason=quantized.reason)
            continue
        checked = check_adapters(quantized.checkpoint, recipe, {"wiki": adapted}, measured.path, DEVICE, validate,
                                 compute, "bfloat16")
        timed = benchmark(name, quantized.checkpoint, recipe, "bfloat16", DEVICE, bench, str(out), reference=reference,
                          base_checkpoint=base.checkpoint, cache_dir=str(cache), adapters_served={"wiki": str(lora)})
        emit(recipe=name, quantize=quantized.status, kernel=getattr(quantized, "kernel", None),
             adapters_status=checked.status, adapters_reason=checked.reason,
             adapters={n: gated(a) for n, a in checked.adapters.items()}, benchmark_status=timed.status,
             benchmark_reason=timed.reason, latency=decode(timed.latency),
             with_adapter={n: decode((b or {}).get("latency")) | {"error": (b or {}).get("error")}
                           for n, b in (timed.adapters or {}).items()})


def gated(found: dict) -> dict:
    """An adapter's verdict on a recipe, without the per-layer and per-prompt detail."""
    keep = ("verdict", "reasons", "notes", "kl_mean", "top1_agreement", "nonfinite", "effect", "error")
    return {k: found.get(k) for k in keep} | {"equivalence": {
        check: {k: v for k, v in result.items() if k in ("supported", "identical", "top1_agreement", "max_abs_logit_diff",
                                                          "reason")}
        for check, result in (found.get("equivalence") or {}).items()}}


def decode(latency: dict | None) -> dict:
    latency = latency or {}
    run = (latency.get("runs") or [{}])[0]
    return {"decode_ms_per_token": latency.get("decode_ms_per_token"), "path": latency.get("path"),
            "fallback_reason": run.get("fallback_reason"), "speedup_vs_reference": latency.get("speedup_vs_reference")}


if __name__ == "__main__":
    main(sys.argv[1])
