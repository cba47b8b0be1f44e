"""A model larger than one GPU's limit, placed over two GPUs (issue 21), through the steps' own functions:
the Gemma-3-12B-shaped checkpoint (random bf16, 23.5 GB) with model.max_memory
{0: LIMIT, 1: LIMIT} so that neither GPU holds it alone; the reference loaded and its validation statistics
measured, bnb-nf4 quantized while loading over both GPUs, saved, reloaded and validated; then the benchmark
of the reference and of nf4, placed over both GPUs and on one GPU, eager decoding both ways (the CUDA-graph
path cannot span devices), with each GPU's peak. One JSON line per result.
Usage (run_on_gpu.sh, case `multigpu`):  python docs/gpu/multigpu_on_gpu.py CKPT_DIR TOKENIZER_DIR
LAYERS=2: a quick try on a few layers first.
"""
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402

from quantgate import drift, modeling  # noqa: E402
from quantgate.bench import worker  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.results import ReferenceValidation  # noqa: E402
from quantgate.settings import BenchmarkSettings, ValidateSettings  # noqa: E402
from tasks import quantize as quantize_step  # noqa: E402
from tasks import validate as validate_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
LIMIT = os.environ.get("LIMIT", "14GiB")
SETTINGS = ValidateSettings(max_new_tokens=int(os.environ.get("NEW", 16)))


def emit(**line) -> None:
    print(json.dumps(line, default=str), flush=True)


def make(folder: Path, tokenizer_dir: Path) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                              num_hidden_layers=int(os.environ.get("LAYERS", 48)), num_attention_heads=16,
                              num_key_value_heads=8, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256,
                              max_position_embeddings=4096)
    config.architectures = ["Gemma3ForCausalLM"]
    t0 = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda:0"):
        model = Gemma3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    for f in tokenizer_dir.glob("*"):  # SmolLM2's tokenizer stands in: its ids all lie inside Gemma's vocabulary
        shutil.copy(f, folder / f.name)
    del model
    torch.cuda.empty_cache()
    emit(made=str(folder), seconds=round(time.time() - t0, 1))


def peaks() -> dict:
    return {f"gpu{g}_peak_GB": round(torch.cuda.max_memory_allocated(g) / 1e9, 2) for g in range(torch.cuda.device_count())}


def reset() -> None:
    gc.collect()  # accelerate's hooks hold the last model in reference cycles: free it before the next peak
    for g in range(torch.cuda.device_count()):
        torch.cuda.synchronize(g)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(g)


def main(checkpoint: Path, tokenizer_dir: Path) -> None:
    if not (checkpoint / "config.json").is_file():
        make(checkpoint, tokenizer_dir)
    config = load_config(ROOT / "configs" / "default.yaml",
                         [f"model.source={checkpoint}", "model.device=auto", f"model.max_memory={{0: {LIMIT}, 1: {LIMIT}}}",
                          "recipes=[bnb-nf4]"])
    placed = modeling.placement(config.model.device, config.model.max_memory)
    emit(gpus=torch.cuda.device_count(), names=[torch.cuda.get_device_name(g) for g in range(torch.cuda.device_count())],
         placement=placed, torch=torch.__version__, transformers=transformers.__version__)
    from quantgate.plan import planned_placement
    emit(planned=planned_placement(modeling.skeleton(transformers.AutoConfig.from_pretrained(checkpoint)), config))

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reset()
    t0 = time.time()
    model = modeling.load(checkpoint, "bfloat16", placed)
    load_s = time.time() - t0
    emit(step="reference load", seconds=round(load_s, 1), devices=modeling.devices_of(model), **peaks())
    t0 = time.time()
    stats = drift.reference_stats(model, tokenizer, checkpoint.name, "bfloat16", Path("/tmp/mg-cache"), SETTINGS)
    emit(step="reference validate", seconds=round(time.time() - t0, 1), nonfinite=stats["nonfinite"], **peaks())
    del model
    reset()

    recipe = config.recipes[0]
    out = Path("/tmp/mg-runs/bnb-nf4")
    t0 = time.time()
    quantized = quantize_step.quantize(str(checkpoint), recipe, "bfloat16", placed, str(out), 0.9, "/tmp/mg-cache",
                                       "/tmp/mg-registry")
    emit(step="quantize bnb-nf4", status=quantized.status, reason=quantized.reason,
         seconds=round(time.time() - t0, 1), quantize_s=getattr(quantized, "quantize_s", None),
         real_bytes=quantized.real_bytes, roundtrip=getattr(quantized, "roundtrip", None),
         devices=getattr(quantized, "devices", None), **peaks())
    reset()
    t0 = time.time()
    validated = validate_step.validate(quantized.checkpoint, recipe, ReferenceValidation(**stats), placed, SETTINGS,
                                       "bfloat16")
    emit(step="validate bnb-nf4", verdict=validated.verdict, kl_mean=validated.kl_mean,
         top1=validated.top1_agreement, seconds=round(time.time() - t0, 1), **peaks())
    reset()

    settings = BenchmarkSettings(prompt_tokens=256, new_tokens=int(os.environ.get("TOKENS", 64)), repeats=3,
                                 fast_path="off")
    for name, path, spec_recipe in (("reference", str(checkpoint), None),
                                    ("bnb-nf4", quantized.checkpoint, recipe.model_dump(mode="json"))):
        for where, device in (("two GPUs", placed), ("one GPU", "cuda")):
            t0 = time.time()
            try:
                result = worker.measure(worker.Spec(checkpoint=path, recipe=spec_recipe, dtype="bfloat16",
                                                    device=device, settings=settings, out_dir=str(out),
                                                    mode="saved" if spec_recipe else "reference"))
            except Exception as e:  # the reference on one GPU fits an H200: a limit would be needed to refuse it
                emit(benchmark=name, where=where, error=f"{type(e).__name__}: {str(e)[:200]}")
                continue
            run = result["latency"]["runs"][0]
            emit(benchmark=name, where=where, decode_ms_per_token=run["decode_ms_per_token"], prefill_ms=run.get("prefill_ms"),
                 path=run["path"], fallback=run.get("fallback_reason"), x_floor=run.get("of_bandwidth_floor"),
                 decode_ms_all=run["decode_ms_all"],
                 gpu_peak_infer_GB=round(result["memory"]["gpu_peak_infer"] / 1e9, 2),
                 by_device={k: round(v / 1e9, 2) for k, v in result["memory"]["infer"].get("gpu_peak_allocated_by_device", {}).items()},
                 bytes_by_device={k: round(v / 1e9, 2) for k, v in result["placement"]["param_bytes_by_device"].items()},
                 seconds=round(time.time() - t0, 1))
            reset()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
