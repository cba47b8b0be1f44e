"""The towers' validation (issue 17) on the GPU: a Gemma-3-12B-shaped multimodal checkpoint (random bf16
weights; Gemma 3 12B's text shapes and its SigLIP-so400m vision tower, 896 px, 256 image tokens), its
reference measured once (the text pass and the tower pass timed apart), then bnb-nf4 with the vision tower
and projector skipped (as configs/gemma3-12b-it.yaml) and not skipped, each quantized and validated by the
steps' own functions. Usage (see run_on_gpu.sh, case `towers`):
  python docs/gpu/towers_on_gpu.py CKPT_DIR TOKENIZER_DIR
LAYERS=2 DEVICE=cpu: a dry run on a CPU.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from quantgate import drift, modeling, towers  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.results import ReferenceValidation  # noqa: E402
from quantgate.settings import ValidateSettings  # noqa: E402
from quantgate.processors import load_processor  # noqa: E402
from tasks import quantize as quantize_step  # noqa: E402
from tasks import validate as validate_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("DEVICE", "cuda")
LAYERS = int(os.environ.get("LAYERS", 48))
SETTINGS = ValidateSettings(max_new_tokens=int(os.environ.get("NEW", 32)))  # NEW=2: a quick dry run


def emit(**line) -> None:
    print(json.dumps(line), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def make(folder: Path, tokenizer_dir: Path) -> None:
    """Gemma 3 12B's shapes with SmolLM2's tokenizer (plus Gemma 3's three image tokens) standing in."""
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, extra_special_tokens=tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    text = Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=LAYERS,
                            num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                            query_pre_attn_scalar=256, max_position_embeddings=4096)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=min(27, LAYERS * 27 // 48 or 1),
                                num_attention_heads=16, image_size=896, patch_size=14, vision_use_head=False)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=256,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():  # transformers initialises the projector to zeros: a trained one is not
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.02)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 896, "width": 896}), tokenizer=tokenizer,
                    image_seq_length=256).save_pretrained(folder)
    emit(made=str(folder), text_layers=LAYERS, vision_layers=vision.num_hidden_layers, seconds=round(time.time() - t0, 1))
    del model
    torch.cuda.empty_cache()


def reference(folder: Path) -> dict:
    """The reference's text statistics and tower measurements, each pass timed on its own."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = modeling.load(folder, "bfloat16", DEVICE)
    emit(reference_load_s=round(time.perf_counter() - t0, 1), real_bytes=modeling.real_bytes(model))
    sync()
    t0 = time.perf_counter()
    stats = drift.reference_stats(model, AutoTokenizer.from_pretrained(folder), folder.name, "bfloat16",
                                  Path("/tmp/qg-cache"), SETTINGS)
    sync()
    t1 = time.perf_counter()
    cache = Path("/tmp/qg-cache") / f"{folder.name}-{towers.cache_name()}"
    cached = cache.is_file()  # a second call on the same machine: the timings below are not the passes'
    stats["towers"] = towers.reference_towers(model, load_processor(folder), cache, SETTINGS.max_new_tokens)
    sync()
    t2 = time.perf_counter()
    emit(cached=cached, reference_text_pass_s=round(t1 - t0, 2), text_prompts=len(drift.load_prompts()),
         reference_tower_pass_s=round(t2 - t1, 2), image_prompts=len(towers.prompts("image")),
         max_new_tokens=SETTINGS.max_new_tokens, gpu_peak=torch.cuda.max_memory_allocated() if DEVICE == "cuda" else None)
    del model
    torch.cuda.empty_cache()
    return stats


def recipe(skip: list[str]):
    nf4 = load_config(ROOT / "configs" / "default.yaml", ["recipes=[bnb-nf4]"]).recipes[0]
    return nf4.model_copy(update={"skip": skip, "name": "bnb-nf4" + ("-towers-skipped" if skip else "-all")})


def run_recipe(folder: Path, ref: dict, skip: list[str]) -> None:
    r = recipe(skip)
    out = Path("/tmp/qg-out") / r.name
    t0 = time.time()
    quantized = quantize_step.quantize(str(folder), r, "bfloat16", DEVICE, str(out), 0.95, "/tmp/qg-cache")
    emit(recipe=r.name, quantize_status=quantized.status, quantize_s=round(time.time() - t0, 1),
         real_bytes=quantized.real_bytes, towers_plan=getattr(quantized, "towers", None))
    if quantized.status != "ok":
        emit(recipe=r.name, reason=quantized.reason)
        return
    t0 = time.time()
    checked = validate_step.validate(quantized.checkpoint, r, ReferenceValidation(**ref), DEVICE, SETTINGS)
    tower = {name: {k: v for k, v in t.items() if k != "answers"} | {"answers": t["answers"][:6]}
             for name, t in getattr(checked, "towers", {}).items()}
    emit(recipe=r.name, validate_s=round(time.time() - t0, 1), verdict=checked.verdict, reasons=checked.reasons,
         text={k: getattr(checked, k, None) for k in ("kl_mean", "kl_p99", "top1_agreement", "first_nonfinite_module")},
         towers=tower)
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.empty_cache()


def main(folder: Path, tokenizer_dir: Path) -> None:
    emit(torch=torch.__version__, device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE)
    if not (folder / "config.json").is_file():
        make(folder, tokenizer_dir)
    ref = reference(folder)
    which = os.environ.get("RECIPES", "skipped,all").split(",")
    if "skipped" in which:
        run_recipe(folder, ref, ["model.vision_tower", "model.multi_modal_projector"])
    if "all" in which:
        run_recipe(folder, ref, [])


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
