"""Quantize step: plan, quantize, save as safetensors, load back, compare logits.

The plan is made on the model's skeleton (meta device) before any weight is loaded: every Linear
is `quantized`, `skipped` (by which pattern) or `fallback` (left in high precision because its
shape does not tile for the recipe). After quantizing, the plan is checked against what the
library really did, and any Linear it left alone unannounced is reported as a fallback too.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import shutil
from pathlib import Path

import torch
from prefect import task
from pydantic import TypeAdapter

from quantgate import modeling
from quantgate.config import (BitsAndBytesRecipe, ConfigError, FineGrainedFp8Recipe, QuantoRecipe, Recipe,
                              RunConfig, TorchAoRecipe, needs_cuda)
from quantgate.record import write_json
from tasks.download import DownloadError, parse_source, read_model_config

log = logging.getLogger("quantgate.quantize")


class PlanError(ValueError):
    """A recipe that cannot apply to this model; `field` is the recipe field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


# ---------------------------------------------------------------- the plan

def pattern_regex(pattern: str) -> re.Pattern:
    """A full dotted path that covers itself and everything under it; '*' is one path segment."""
    body = r"[^.]+".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(rf"^{body}(\..+)?$")


def output_embedding_name(model: torch.nn.Module) -> str | None:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((name for name, module in model.named_modules() if module is out), None) if out is not None else None


def tiling_problem(recipe: Recipe, out_features: int, in_features: int) -> str | None:
    """Why a Linear of this shape would be left in high precision by the recipe's library."""
    if isinstance(recipe, TorchAoRecipe):
        if recipe.scheme == "int4_weight_only" and in_features % recipe.group_size:
            return f"in_features {in_features} is not a multiple of group_size {recipe.group_size}"
        if recipe.scheme == "float8_dynamic_activation" and (in_features % 16 or out_features % 16):
            return f"float8 matmuls need both dims multiple of 16, got {out_features}x{in_features}"
    return None


def plan_recipe(model: torch.nn.Module, recipe: Recipe) -> list[dict]:
    """One entry per Linear of the model; raises PlanError for patterns or blocks that don't fit."""
    names = [name for name, _ in model.named_modules() if name]
    compiled = []
    for i, pattern in enumerate(recipe.skip):
        regex = pattern_regex(pattern)
        if not any(regex.match(n) for n in names):
            hints = sorted({n for n in names if n.endswith("." + pattern) or n.split(".")[-1] == pattern},
                           key=len)[:3]
            hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
            raise PlanError(f"skip[{i}]", f"'{pattern}' matches no module of {type(model).__name__}: skip patterns "
                                          f"are full dotted module paths such as 'model.layers.0.mlp'{hint}")
        compiled.append((pattern, regex))
    head = output_embedding_name(model)
    entries = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        entry = {"module": name, "shape": [module.out_features, module.in_features]}
        by = next((p for p, regex in compiled if regex.match(name)), None)
        if by is not None:
            entry.update(status="skipped", reason=f"skip pattern '{by}'")
        elif name == head:
            # Every library here keeps the output embedding in high precision by default.
            entry.update(status="skipped", reason="output embedding (kept in high precision by default)")
        elif isinstance(recipe, FineGrainedFp8Recipe):
            rows, cols = recipe.weight_block_size
            if module.out_features % rows or module.in_features % cols:
                raise PlanError("weight_block_size", f"{rows}x{cols} blocks do not divide {name} "
                                f"({module.out_features}x{module.in_features}); allowed: block sizes that divide both "
                                f"dims of every quantized layer, or skip the layer")
            entry["status"] = "quantized"
        elif problem := tiling_problem(recipe, module.out_features, module.in_features):
            entry.update(status="fallback", reason=problem)
        else:
            entry["status"] = "quantized"
        entries.append(entry)
    return entries


def summarize(entries: list[dict]) -> dict:
    return {status: sum(e["status"] == status for e in entries) for status in ("quantized", "skipped", "fallback")}


# ---------------------------------------------------------------- quantizing

def quantization_config(recipe: Recipe, keep: list[str]):
    """The transformers quantization config of a recipe; `keep` are full names left unquantized."""
    if isinstance(recipe, BitsAndBytesRecipe):
        from transformers import BitsAndBytesConfig
        if recipe.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.quant_type,
                                  bnb_4bit_use_double_quant=recipe.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, recipe.compute_dtype),
                                  llm_int8_skip_modules=keep)
    if isinstance(recipe, TorchAoRecipe):
        from transformers import TorchAoConfig
        from torchao import quantization as ao
        if recipe.scheme == "int4_weight_only" and recipe.int4_packing_format == "plain" \
                and importlib.util.find_spec("mslk") is None:
            raise ValueError(f"recipe {recipe.name}: int4_packing_format 'plain' needs the mslk package "
                             "(pip install mslk-cuda); 'tile_packed_to_4d' needs nothing more")
        quant_type = {
            "int8_weight_only": lambda: ao.Int8WeightOnlyConfig(),
            "int8_dynamic_activation": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
            "int4_weight_only": lambda: ao.Int4WeightOnlyConfig(
                group_size=recipe.group_size, int4_packing_format=recipe.int4_packing_format,
                int4_choose_qparams_algorithm=recipe.int4_qparams),
            "float8_dynamic_activation": lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()),
        }[recipe.scheme]()
        return TorchAoConfig(quant_type, modules_to_not_convert=keep)
    if isinstance(recipe, FineGrainedFp8Recipe):
        from transformers import FineGrainedFP8Config
        return FineGrainedFP8Config(weight_block_size=tuple(recipe.weight_block_size), modules_to_not_convert=keep)
    return None  # quanto quantizes after loading, through optimum-quanto (transformers can't save it)


def quantize_model(checkpoint: str, recipe: Recipe, dtype: str, device: str, keep: list[str],
                   **load_kwargs) -> torch.nn.Module:
    with modeling.timed(f"quantize {recipe.name}"):
        model = modeling.load(checkpoint, dtype, device, quantization_config(recipe, keep), **load_kwargs)
        if isinstance(recipe, QuantoRecipe):
            from optimum.quanto import QuantizedModelForCausalLM, qint4, qint8
            weights = {"int8": qint8, "int4": qint4}[recipe.weights]
            model = QuantizedModelForCausalLM.quantize(model, weights=weights, exclude=keep)._wrapped
    return model


def save(model: torch.nn.Module, recipe: Recipe, tokenizer, out: Path) -> None:
    """Safetensors checkpoint with tokenizer; written to a temp folder, then renamed."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(recipe, QuantoRecipe):
        from optimum.quanto import QuantizedModelForCausalLM
        QuantizedModelForCausalLM(model).save_pretrained(tmp)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def load_saved(path: Path, recipe: Recipe, device: str) -> torch.nn.Module:
    if isinstance(recipe, QuantoRecipe):
        from optimum.quanto import QuantizedModelForCausalLM
        return QuantizedModelForCausalLM.from_pretrained(path)._wrapped.to(device).eval()
    return modeling.load(path, "auto", device)


def reconcile(entries: list[dict], model: torch.nn.Module) -> list[dict]:
    """The plan against what the library did: unannounced high-precision layers become fallbacks."""
    modules = dict(model.named_modules())
    for entry in entries:
        done = modeling.is_quantized(modules[entry["module"]])
        if entry["status"] == "quantized" and not done:
            entry.update(status="fallback", reason="left in high precision by the library (shape or type)")
        elif entry["status"] != "quantized" and done:
            entry.update(status="quantized", reason=f"quantized although planned {entry['status']}: {entry['reason']}")
    return entries


def cuda_skip(recipe: Recipe, device: str) -> dict | None:
    """A step's record for a recipe that cannot run on this machine's device, or None."""
    if device == "cpu" and (why := needs_cuda(recipe)):
        return {"status": "skipped", "reason": f"needs CUDA ({why}); this machine has none"}
    return None


def quantize(checkpoint: str, recipe: dict, dtype: str, device: str, out_dir: str, roundtrip_min_top1: float) -> dict:
    """Quantize one recipe; returns the step's record (status, metrics, paths)."""
    from transformers import AutoConfig, AutoTokenizer

    recipe = TypeAdapter(Recipe).validate_python(recipe)
    device = modeling.resolve_device(device)
    if skipped := cuda_skip(recipe, device):
        return skipped
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = plan_recipe(modeling.skeleton(AutoConfig.from_pretrained(checkpoint)), recipe)
    keep = [e["module"] for e in entries if e["status"] == "skipped"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)

    model = quantize_model(checkpoint, recipe, dtype, device, keep)
    entries = reconcile(entries, model)
    counts = summarize(entries)
    write_json(out / "plan.json", {"recipe": recipe.model_dump(mode="json"), "modules": entries, "summary": counts})
    in_memory = modeling.probe_logits(model, tokenizer)
    metrics = {"real_bytes": modeling.real_bytes(model), "quantized_modules": counts["quantized"],
               "skipped_modules": counts["skipped"], "fallback_modules": counts["fallback"],
               "footprint_reported_by_transformers": model.get_memory_footprint()
               if hasattr(model, "get_memory_footprint") else None}
    save(model, recipe, tokenizer, out / "checkpoint")
    del model
    reloaded = load_saved(out / "checkpoint", recipe, device)
    metrics["roundtrip"] = modeling.compare_logits(in_memory, modeling.probe_logits(reloaded, tokenizer))
    metrics["checkpoint"] = str(out / "checkpoint")
    rt = metrics["roundtrip"]
    if not rt["finite"]:
        return {"status": "failed", "reason": "the reloaded checkpoint gives non-finite logits", **metrics}
    if rt["top1_agreement"] < roundtrip_min_top1:
        return {"status": "failed", "reason": f"the reloaded checkpoint disagrees with the in-memory model: top-1 "
                f"agreement {rt['top1_agreement']:.3f} < {roundtrip_min_top1}", **metrics}
    if metrics["quantized_modules"] == 0:
        return {"status": "failed", "reason": "no Linear layer was quantized", **metrics}
    warnings = []
    if not rt["identical"]:
        warnings.append(f"the reloaded checkpoint's logits differ from the in-memory model's (max |diff| "
                        f"{rt['max_abs_logit_diff']:.3g}, top-1 agreement {rt['top1_agreement']:.3f})")
    if metrics["fallback_modules"]:
        warnings.append(f"{metrics['fallback_modules']} Linear layers left in high precision (see plan.json)")
    return {"status": "ok", "warnings": warnings, **metrics}


def make_plans(config: RunConfig, config_path: str | Path) -> dict[str, list[dict]]:
    """Every recipe's plan on the model's skeleton; raises ConfigError before any weight is loaded."""
    try:
        source = parse_source(config.model.source, config.model.revision)
        model_config = read_model_config(source, Path(config.output.cache_dir))
    except DownloadError as e:
        raise ConfigError(config_path, "model.source", str(e)) from None
    model = modeling.skeleton(model_config)
    plans = {}
    for i, recipe in enumerate(config.recipes):
        try:
            plans[recipe.name] = plan_recipe(model, recipe)
        except PlanError as e:
            raise ConfigError(config_path, f"recipes[{i}].{e.field}", f"{recipe.name}: {e}") from None
    return plans


quantize_task = task(quantize, name="quantize", task_run_name="quantize-{recipe[name]}")
