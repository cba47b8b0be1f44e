"""Quantize step: plan, quantize, save as safetensors, load back, compare logits.

The plan (quantgate.plan) is made on the model's skeleton before any weight is loaded; after quantizing it is
checked against what the library really did, and any Linear it left alone unannounced is reported as a fallback.
How a recipe quantizes, saves and loads is its backend's business (quantgate.backends)."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from quantgate import modeling
from quantgate.backends import RecipeBase, backend_of
from quantgate.backends.given import local_source
from quantgate.fetching import fetched
from quantgate.files import WEIGHT_FILES, write_json
from quantgate.loading import cuda_skip, growth, kernel_of, load_quantized, load_saved
from quantgate.plan import checkpoint_bytes, kept, plan_recipe, read_plan, reconcile, summarize, towers
from quantgate.results import Quantized

PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")  # a multimodal model's image/audio side
DISK_SPARE = 1.10  # room for what the estimate leaves out: torchao int4's tile padding, per-row scales, file headers


def quantize(checkpoint: str, recipe: RecipeBase, dtype: str, device: str | dict, out_dir: str,
             roundtrip_min_top1: float, cache_dir: str = ".cache/quantgate", registry_dir: str = "registry") -> Quantized:
    """Quantize one recipe (or take a given checkpoint): its checkpoint saved in out_dir, loaded back and checked."""
    from transformers import AutoConfig

    device = modeling.resolve_device(device)
    if skipped := cuda_skip(recipe, device):
        return Quantized(**skipped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if backend_of(recipe).given:
        return take_given(checkpoint, recipe, dtype, device, out, Path(cache_dir), Path(registry_dir))
    skeleton = modeling.skeleton(AutoConfig.from_pretrained(checkpoint))
    entries = plan_recipe(skeleton, recipe)
    needed = disk_needed(skeleton, entries, recipe, dtype, Path(checkpoint))
    if short := disk_shortfall(needed, out):  # before the load: a full disk would stop the save half-written
        return Quantized(status="error", reason=short, checkpoint_bytes_estimated=needed)
    metrics = quantize_and_reload(checkpoint, recipe, dtype, device, entries, out)
    metrics["checkpoint_bytes_estimated"] = needed
    return roundtrip_verdict(metrics, roundtrip_min_top1)


def quantize_and_reload(checkpoint: str, recipe: RecipeBase, dtype: str, device, entries: list[dict], out: Path) -> dict:
    """Quantize, save, load back: the plan's counts, the bytes and the logits before saving against after."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    t0 = time.perf_counter()
    model = load_quantized(checkpoint, recipe, dtype, device, kept(entries), tokenizer)
    quantize_s = time.perf_counter() - t0
    metrics = write_plan(out, recipe, reconcile(entries, model, recipe))
    in_memory = modeling.probe_logits(model, tokenizer)
    t0 = time.perf_counter()
    save(model, recipe, tokenizer, out / "checkpoint", Path(checkpoint))
    del model
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    reloaded = load_saved(out / "checkpoint", recipe, device)
    # Bytes of what ships, loaded, then running: a calibrating library may hold fake-quantized weights until
    # it saves, and one may expand its weights on the first forward (compressed-tensors int4 in transformers).
    at_load = modeling.real_bytes(reloaded)
    metrics["roundtrip"] = modeling.compare_logits(in_memory, modeling.probe_logits(reloaded, tokenizer))
    footprint = reloaded.get_memory_footprint() if hasattr(reloaded, "get_memory_footprint") else None
    metrics.update(real_bytes=modeling.real_bytes(reloaded), real_bytes_at_load=at_load,
                   footprint_reported_by_transformers=footprint, checkpoint_bytes=folder_bytes(out / "checkpoint"))
    metrics.update(checkpoint=str(out / "checkpoint"), quantize_s=round(quantize_s, 2), save_s=round(save_s, 2),
                   reload_s=round(time.perf_counter() - t0, 2), devices=modeling.devices_of(reloaded), **kernel_of(recipe))
    return metrics


def roundtrip_verdict(metrics: dict, roundtrip_min_top1: float) -> Quantized:
    """The step's end from what the round trip measured: a checkpoint that does not load back as it was fails."""
    rt = metrics["roundtrip"]
    if not rt["finite"] and rt["finite_before_saving"]:
        return Quantized(status="failed", reason="the reloaded checkpoint gives non-finite logits", **metrics)
    if not rt["finite"]:  # the quantized model itself: the validate step names the module where it starts
        return Quantized(warnings=["the quantized model gives non-finite logits, before saving and after reloading "
                                   "alike"], **metrics)
    if rt["top1_agreement"] < roundtrip_min_top1:
        return Quantized(status="failed", reason=f"the reloaded checkpoint disagrees with the in-memory model: top-1 "
                         f"agreement {rt['top1_agreement']:.3f} < {roundtrip_min_top1}", **metrics)
    if metrics["quantized_modules"] == 0:
        return Quantized(status="failed", reason="no Linear layer was quantized", **metrics)
    warnings = [grown] if (grown := growth(metrics["real_bytes_at_load"], metrics["real_bytes"], "checkpoint")) else []
    if not rt["identical"]:
        warnings.append(f"the reloaded checkpoint's logits differ from the in-memory model's (max |diff| "
                        f"{rt['max_abs_logit_diff']:.3g}, top-1 agreement {rt['top1_agreement']:.3f})")
    if metrics["fallback_modules"]:
        warnings.append(f"{metrics['fallback_modules']} Linear layers left in high precision (see plan.json)")
    return Quantized(status="ok", warnings=warnings, **metrics)


def take_given(base: str, recipe: RecipeBase, dtype: str, device, out: Path, cache_dir: Path, registry_dir: Path) -> Quantized:
    """A checkpoint made elsewhere: checked against the base before any weight moves, fetched (and verified
    by its manifest), loaded as its library loads it, its plan read from the loaded model."""
    from transformers import AutoConfig, AutoTokenizer

    backend, base_config = backend_of(recipe), AutoConfig.from_pretrained(base)
    backend.check_base(recipe, base_config, registry_dir)
    got = fetched(local_source(recipe, registry_dir), recipe.revision, str(cache_dir), dtype)
    path = Path(got["checkpoint"])
    t0 = time.perf_counter()
    model = load_saved(path, recipe, device)
    load_s = time.perf_counter() - t0
    counts = write_plan(out, recipe, read_plan(modeling.skeleton(base_config), model, recipe))
    at_load = modeling.real_bytes(model)
    finite = all(bool(torch.isfinite(x).all()) for x in modeling.probe_logits(model, AutoTokenizer.from_pretrained(path)))
    running = modeling.real_bytes(model)
    metrics = {"given": True, "source": got["source"], "revision": got["revision"],
               "checkpoint_sha256": got["checkpoint_sha256"], "checkpoint": str(path),
               "quantization_config": json.loads((path / "config.json").read_text()).get("quantization_config"),
               "real_bytes": running, "real_bytes_at_load": at_load, **counts, "load_s": round(load_s, 2),
               "probe_finite": finite, **kernel_of(recipe)}
    if counts["quantized_modules"] == 0:
        return Quantized(status="failed", reason="the checkpoint holds no quantized Linear layer", **metrics)
    warnings = [grown] if (grown := growth(at_load, running, "checkpoint")) else []
    if not finite:
        warnings.append("the checkpoint gives non-finite logits on the probe texts")
    return Quantized(status="ok", warnings=warnings, **metrics)


def save(model: torch.nn.Module, recipe: RecipeBase, tokenizer, out: Path, source: Path | None = None) -> None:
    """The backend's checkpoint with the tokenizer (and the source's processor files); written to a temp folder,
    then renamed."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        backend_of(recipe).save(model, recipe, tmp)
        tokenizer.save_pretrained(tmp)
        for name in PROCESSOR_FILES:
            if source is not None and (source / name).is_file():
                shutil.copy(source / name, tmp / name)
    except OSError as e:  # a full disk after the check passed (another writer), a vanished folder: nothing half-kept
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"saving the checkpoint to {out} failed ({e.strerror or e}); the partial files were "
                               "removed") from None
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def disk_needed(model: torch.nn.Module, entries: list[dict], recipe: RecipeBase, dtype: str, source: Path) -> int:
    """Bytes the recipe's checkpoint will take by the plan, with the source's other files (tokenizer, config)."""
    weights = {f for pattern in WEIGHT_FILES for f in source.glob(pattern)}
    others = sum(f.stat().st_size for f in source.iterdir() if f.is_file() and f not in weights)
    return checkpoint_bytes(model, entries, dtype, backend_of(recipe).stored_bits(recipe)) + others


def disk_shortfall(needed: int, out: Path) -> str | None:
    """Why the checkpoint would not fit on out's filesystem, or None."""
    free = shutil.disk_usage(out).free
    if needed * DISK_SPARE <= free:
        return None
    return (f"not enough disk for the checkpoint: about {needed / 1e9:.2f} GB by the plan, {DISK_SPARE - 1:.0%} more to "
            f"spare, and {free / 1e9:.2f} GB free in {out}; free some, or set output.runs_dir on a larger disk")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_plan(out: Path, recipe: RecipeBase, entries: list[dict]) -> dict:
    """plan.json, and the record's counts of it (per tower too, for a multimodal model)."""
    counts, tower_counts = summarize(entries), towers(entries)
    write_json(out / "plan.json", {"recipe": recipe.model_dump(mode="json"), "modules": entries, "summary": counts,
                                   "towers": tower_counts})
    return {"quantized_modules": counts["quantized"], "skipped_modules": counts["skipped"],
            "fallback_modules": counts["fallback"], **({"towers": tower_counts} if tower_counts else {})}
