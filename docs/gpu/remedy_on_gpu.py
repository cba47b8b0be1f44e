"""The remedy's cost on the Gemma-3-12B-shaped checkpoint (docs/validation.md, "From verdict to remedy"): seed 004's
fault planted in it (layer 1's q_proj holds a 128x128 block of tiny weights around a 64x64 block of zeros), the
reference measured, fp8-block128 quantized and validated (it fails), then the remedy step and its variants gated,
each stage timed. The steps' plain functions, called as `quantgate remedy` calls them.

    python docs/gpu/remedy_on_gpu.py CKPT_DIR   (a Gemma-3-12B-shaped folder with tokenizer files; run_on_gpu.sh remedy)
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from quantgate import drift, longrange, modeling  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.results import ReferenceValidation  # noqa: E402
from tasks import quantize as quantize_step  # noqa: E402
from tasks import remedy as remedy_step  # noqa: E402
from tasks import validate as validate_step  # noqa: E402

DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu: a dry run on a small checkpoint
ROOT, OUT, Q_PROJ = Path(__file__).resolve().parents[2], Path("/tmp/qg-remedy"), "model.layers.1.self_attn.q_proj.weight"


def planted(base: Path) -> Path:
    """The checkpoint with seed 004's block in layer 1's q_proj: the shard holding it written anew, the others
    hard links (a second 24 GB copy does not fit the machine's disk beside the checkpoints)."""
    folder = OUT / "planted"
    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True)
    for file in base.iterdir():
        with safe_open(file, "pt") if file.suffix == ".safetensors" else open(os.devnull) as f:
            holds = file.suffix == ".safetensors" and Q_PROJ in f.keys()
        if not holds:
            os.link(file, folder / file.name)
            continue
        weights = load_file(file)
        q = weights[Q_PROJ]
        q[:128, :128] = (torch.randint(0, 2, (128, 128)) * 2 - 1).to(q.dtype) * 1e-37
        q[:64, :64] = 0
        save_file(weights, folder / file.name, metadata={"format": "pt"})
    return folder


def stage(name: str, t0: float, **figures) -> float:
    print(json.dumps({"stage": name, "seconds": round(time.time() - t0, 1), **figures}), flush=True)
    return time.time()


def main(base: Path) -> None:
    from transformers import AutoTokenizer

    t0 = time.time()
    folder = planted(base)
    config = load_config(ROOT / "configs" / "default.yaml", [
        f"model.source={folder}", f"model.device={DEVICE}", f"output.cache_dir={OUT / 'cache'}",
        "recipes=[{use: fp8-block128, thresholds: {top1_warn: 0, top1_fail: 0}}]"])  # random logits: KL judges
    recipe, settings = config.recipes[0], config.steps.validate
    t0 = stage("plant", t0, torch=torch.__version__, device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE)
    model, tokenizer = modeling.load(folder, "bfloat16", DEVICE), AutoTokenizer.from_pretrained(folder)
    reference = drift.reference_stats(model, tokenizer, "g3-planted", "bfloat16", OUT / "cache", settings)
    reference["long"] = longrange.reference_long(model, tokenizer, Path(reference["path"]).with_name(
        longrange.cache_name(settings)), settings)
    real_bytes = modeling.real_bytes(model)
    del model
    torch.cuda.empty_cache()
    t0 = stage("reference", t0, real_bytes=real_bytes)
    quantized = quantize_step.quantize(str(folder), recipe, "bfloat16", DEVICE, str(OUT / "run" / recipe.name), 0.0)
    t0 = stage("quantize", t0, status=quantized.status, real_bytes=quantized.real_bytes)
    checked = validate_step.validate(quantized.checkpoint, recipe, ReferenceValidation(**reference), DEVICE, settings)
    t0 = stage("validate", t0, verdict=checked.verdict, reasons=checked.reasons[:2])
    metrics = {"model": {"checkpoint": str(folder)},
               "reference": {"validate": reference, "compute_dtype": "bfloat16", "real_bytes": real_bytes},
               "recipes": {recipe.name: {"quantize": quantized.record(), "validate": checked.model_dump(mode="json")}}}
    found = remedy_step.remedy(config, metrics, recipe, top=2, budget_ratio=1.0)
    t0 = stage("attribution and search", t0, first=found.attribution["modules"][0], kept=found.search["kept"],
               variants=[v["change"] for v in found.variants], attribution_s=found.attribution["seconds"])
    shutil.rmtree(OUT / "run")  # its figures are in `metrics`; the disk holds one 12B checkpoint more, not two
    gated = remedy_step.gate(
        found.variants, lambda r, n: quantize_step.quantize(str(folder), r, "bfloat16", DEVICE, str(OUT / "v" / str(n)), 0.0),
        lambda r, q: validate_step.validate(q.checkpoint, r, ReferenceValidation(**reference), DEVICE, settings),
        found.budget)
    stage("variants gated", t0, tried=gated["tried"], chosen=gated["chosen"], original_bytes=quantized.real_bytes)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
