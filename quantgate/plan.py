"""The plan: for every Linear of a model, whether a recipe quantizes it, skips it (by which pattern)
or leaves it in high precision because its shape does not tile for the recipe's library (a
fallback). It is made on the model's skeleton (meta device) before any weight is loaded, and checked
after quantizing against what the library really did."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import psutil
import torch

from quantgate import adapters, modeling
from quantgate.backends import PlanError, backend_of
from quantgate.config import ConfigError
from quantgate.fetching import read_model_config
from quantgate.sources import DownloadError, parse_source

__all__ = ["PlanError", "checkpoint_bytes", "make_plans", "pattern_regex", "placement_lines", "plan_recipe",
           "planned_placement", "read_plan", "reconcile", "skeleton_of", "summarize", "tower_lines", "towers"]


def pattern_regex(pattern: str) -> re.Pattern:
    """A full dotted path that covers itself and everything under it; '*' is one path segment."""
    body = r"[^.]+".join(re.escape(part) for part in pattern.split("*"))
    return re.compile(rf"^{body}(\..+)?$")


def skip_patterns(model: torch.nn.Module, skip: list[str]) -> list[tuple[str, re.Pattern]]:
    """The recipe's skip patterns, each checked to match some module (with a suggestion when not)."""
    names = [name for name, _ in model.named_modules() if name]
    compiled = []
    for i, pattern in enumerate(skip):
        regex = pattern_regex(pattern)
        if not any(regex.match(n) for n in names):
            hints = sorted({n for n in names if n.endswith("." + pattern) or n.split(".")[-1] == pattern},
                           key=len)[:3]
            hint = f"; did you mean {' or '.join(hints)}?" if hints else ""
            raise PlanError(f"skip[{i}]", f"'{pattern}' matches no module of {type(model).__name__}: skip patterns "
                                          f"are full dotted module paths such as 'model.layers.0.mlp'{hint}")
        compiled.append((pattern, regex))
    return compiled


def expert_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in module.named_parameters(recurse=False) if n in modeling.EXPERT_WEIGHTS}


def planned(module: torch.nn.Module) -> bool:
    """What a plan has an entry for: each Linear, and each block of 3-D expert weights."""
    return isinstance(module, torch.nn.Linear) or modeling.is_experts(module)


def shape(module: torch.nn.Module) -> dict:
    """A plan entry's shape: out x in for a Linear; for a block of experts, each 3-D weight's (E, out, in)."""
    if modeling.is_experts(module):
        return {"shape": expert_shapes(module), "kind": "experts"}
    return {"shape": [module.out_features, module.in_features]}


def plan_recipe(model: torch.nn.Module, recipe) -> list[dict]:
    """One entry per Linear of the model; raises PlanError for patterns or shapes that don't fit."""
    backend = backend_of(recipe)
    compiled = skip_patterns(model, recipe.skip)
    head = modeling.output_embedding_name(model)
    entries = []
    for name, module in model.named_modules():
        if not planned(module):
            continue
        entry = {"module": name, **shape(module)}
        by = next((p for p, regex in compiled if regex.match(name)), None)
        if by is not None:
            entry.update(status="skipped", reason=f"skip pattern '{by}'")
        elif name == head and not backend.quantizes_output_embedding(recipe):
            entry.update(status="skipped", reason="output embedding (kept in high precision by default)")
        elif modeling.is_experts(module) and (problem := backend.experts(recipe, name, expert_shapes(module))):
            entry.update(status="fallback", reason=problem)
        elif isinstance(module, torch.nn.Linear) and \
                (problem := backend.fallback(recipe, name, module.out_features, module.in_features)):
            entry.update(status="fallback", reason=problem)
        else:
            entry["status"] = "quantized"
        entries.append(entry)
    backend.check_plan(recipe, entries)
    return entries


# The parts of a multimodal model that turn images or audio into what its language model reads.
TOWERS = ("vision_tower", "audio_tower", "multi_modal_projector", "embed_vision", "embed_audio")
PROJECTORS = {"vision_tower": ("multi_modal_projector", "embed_vision"), "audio_tower": ("embed_audio",)}


def with_projectors(tower: str, towers_found: list[str]) -> list[str]:
    """A tower (`model.vision_tower`) and, of `towers_found`, the projectors beside it that hand its output on."""
    parent, _, last = tower.rpartition(".")
    beside = {f"{parent}.{p}" if parent else p for p in PROJECTORS.get(last, ())}
    return [tower] + [t for t in towers_found if t in beside]


def tower_of(module: str) -> str | None:
    """The tower a module belongs to (`model.vision_tower`), or None for the language model."""
    parts = module.split(".")
    return next((".".join(parts[:i + 1]) for i, part in enumerate(parts) if part in TOWERS), None)


def towers(entries: list[dict]) -> dict[str, dict]:
    """Per tower: how many of its layers the plan quantizes, skips or leaves in high precision, and why."""
    found: dict[str, dict] = {}
    for entry in entries:
        if tower := tower_of(entry["module"]):
            counts = found.setdefault(tower, {"quantized": 0, "skipped": 0, "fallback": 0, "reasons": []})
            counts[entry["status"]] += 1
            if entry.get("reason") and entry["reason"] not in counts["reasons"]:
                counts["reasons"].append(entry["reason"])
    return found


def tower_lines(counts: dict[str, dict]) -> list[str]:
    """`model.vision_tower: 0 of 112 quantized (skip pattern 'model.vision_tower')`, a line a tower."""
    return [f"{tower}: {c['quantized']} of {c['quantized'] + c['skipped'] + c['fallback']} quantized"
            + (f" ({'; '.join(c['reasons'])})" if c["reasons"] else "") for tower, c in counts.items()]


def kept(entries: list[dict]) -> list[str]:
    """The full names the library is told to leave alone."""
    return [e["module"] for e in entries if e["status"] == "skipped"]


def weights_of(entry: dict) -> int:
    """How many weights a plan entry holds: out x in, or every expert's."""
    shapes = entry["shape"].values() if isinstance(entry["shape"], dict) else [entry["shape"]]
    return sum(math.prod(s) for s in shapes)


def checkpoint_bytes(model: torch.nn.Module, entries: list[dict], dtype: str, stored_bits: float | None) -> int:
    """The saved weights' bytes by the plan: every parameter (tied ones once) in dtype, the quantized
    weights at stored_bits each; a quantized head tied to the input embedding is untied, and the embedding stays."""
    dtype_bytes = getattr(torch, dtype).itemsize
    total = sum(p.numel() for p in model.parameters()) * dtype_bytes
    if stored_bits is None:
        return total
    quantized = [e for e in entries if e["status"] == "quantized"]
    head = modeling.output_embedding_name(model)
    tied = modeling.tied_output_embedding(model)
    untied = sum(weights_of(e) for e in quantized if e["module"] == head) if tied else 0
    return round(total + untied * dtype_bytes - sum(weights_of(e) for e in quantized) * (dtype_bytes - stored_bits / 8))


def summarize(entries: list[dict]) -> dict:
    return {status: sum(e["status"] == status for e in entries) for status in ("quantized", "skipped", "fallback")}


def read_plan(base: torch.nn.Module, model: torch.nn.Module, recipe) -> list[dict]:
    """A checkpoint made elsewhere: for each of the base's Linear layers, whether the loaded model holds it
    quantized, and as what."""
    modules = dict(model.named_modules())
    backend = backend_of(recipe)
    entries = []
    for name, module in base.named_modules():
        if planned(module):
            loaded = modules[name]
            entry = {"module": name, **shape(module), "as": modeling.held_as(loaded)}
            if backend.is_quantized(loaded):
                entry["status"] = "quantized"
            else:
                entry.update(status="skipped", reason="kept in high precision by the checkpoint")
            entries.append(entry)
    return entries


def reconcile(entries: list[dict], model: torch.nn.Module, recipe) -> list[dict]:
    """The plan against what the library did: unannounced high-precision layers become fallbacks."""
    modules = dict(model.named_modules())
    backend = backend_of(recipe)
    for entry in entries:
        done = backend.is_quantized(modules[entry["module"]])
        if entry["status"] == "quantized" and not done:
            entry.update(status="fallback", reason="left in high precision by the library (shape or type)")
        elif entry["status"] != "quantized" and done:
            entry.update(status="quantized", reason=f"quantized although planned {entry['status']}: {entry['reason']}")
    return entries


def skeleton_of(config, config_path) -> tuple:
    """The model's transformers config and its module tree on the meta device; ConfigError where either fails."""
    try:
        source = parse_source(config.model.source, config.model.revision)
        model_config = read_model_config(source, Path(config.output.cache_dir))
    except DownloadError as e:
        raise ConfigError(config_path, "model.source", str(e)) from None
    try:
        return model_config, modeling.skeleton(model_config)
    except Exception as e:  # e.g. a config.json whose architectures and model_type belong to different models
        raise ConfigError(config_path, "model.source", f"{source.text}: its config.json does not build a model "
                          f"(model_type {getattr(model_config, 'model_type', None)!r}, architectures "
                          f"{getattr(model_config, 'architectures', None)}): {type(e).__name__}: {e}") from None


def make_plans(config, config_path, skeleton: tuple | None = None) -> dict[str, list[dict]]:
    """Every recipe's plan on the model's skeleton (skeleton_of's, made here unless given); raises ConfigError,
    with every problem found, before any weight is loaded."""
    model_config, model = skeleton or skeleton_of(config, config_path)
    plans, errors = {}, []
    try:
        planned_placement(model, config)
    except PlanError as e:
        errors.append(ConfigError(config_path, f"model.{e.field}", str(e)))
    if short := memory_shortfall(model, config):
        errors.append(ConfigError(config_path, "model.source", short))
    for i, recipe in enumerate(config.recipes):
        try:
            backend_of(recipe).check_base(recipe, model_config, config.steps.publish.registry_dir)
            plans[recipe.name] = plan_recipe(model, recipe)
        except PlanError as e:
            errors.append(ConfigError(config_path, f"recipes[{i}].{e.field}", f"{recipe.name}: {e}"))
    errors += adapter_errors(config, config_path, model)
    if errors:
        raise ConfigError.of(errors)
    return plans


def adapter_errors(config, config_path, model: torch.nn.Module) -> list[ConfigError]:
    """Each adapter's problems on the model's skeleton: a source that is not an adapter, targets that match nothing
    or a wrapper peft cannot adapt, weights for layers the model lacks or sizes it does not have."""
    errors = []
    for i, spec in enumerate(config.adapters):
        try:
            folder = adapters.fetch(spec.source, Path(config.output.cache_dir))
            problems = adapters.check(folder, model)
        except adapters.AdapterError as e:
            errors.append(ConfigError(config_path, f"adapters[{i}].{e.field}", f"{spec.name}: {e}"))
            continue
        # A target is the adapter's own field: the error names its file.
        errors += [ConfigError(folder / "adapter_config.json", field, f"adapter {spec.name} (adapters[{i}]): {problem}")
                   if field == "target_modules" else
                   ConfigError(config_path, f"adapters[{i}].{field}", f"{spec.name}: {problem}")
                   for field, problem in problems]
    return errors


MEMORY_SPARE = 1.10  # activations, the loader's buffers and the libraries beside the weights


def free_memory(device: str) -> int:
    """Bytes free where a model of `device` ("cpu", "cuda", "cuda:N") would load: the GPU's, or the host's."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    return psutil.virtual_memory().available


def memory_shortfall(model: torch.nn.Module, config) -> str | None:
    """Why the unquantized reference cannot be loaded here (its weights in the dtype it computes in, against the
    memory the device has free), or None. Limits set in model.max_memory are planned_placement's to check."""
    if config.model.max_memory:
        return None
    try:
        device = modeling.resolve_device(modeling.placement(config.model.device, None))
    except RuntimeError:  # no CUDA where the config asks for it: the flow's own error names it
        return None
    dtype = modeling.compute_dtype(config.model.dtype, device if isinstance(device, str) else "cuda",
                                   config.model.compute_dtype)
    count = sum(p.numel() for p in model.parameters())
    needed = count * torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    if not isinstance(device, str):
        return None  # several GPUs: planned_placement, with each GPU's own limit
    free = free_memory(device)
    where = f"GPU {torch.device(device).index or 0}" if device.startswith("cuda") else "this host"
    if needed * MEMORY_SPARE <= free:
        return None
    return (f"the unquantized model ({count:,} parameters) needs about {needed / 1e9:.2f} GB in {dtype} to load, "
            f"{MEMORY_SPARE - 1:.0%} more to spare, and {where} has {free / 1e9:.2f} GB available; use a machine "
            "with more memory, or set model.max_memory with a cpu entry to offload")


def planned_placement(model: torch.nn.Module, config) -> dict[str, int]:
    """Blocks of the unquantized model per device under model.max_memory, as accelerate would place them;
    empty without limits. PlanError where the model does not fit the GPUs (and a `cpu` entry) given."""
    limits = config.model.max_memory
    if not limits:
        return {}
    device_map = modeling.planned_device_map(model, limits, getattr(torch, config.model.dtype))
    counts = Counter(str(d) for d in device_map.values())
    if spilled := {d: n for d, n in counts.items() if d == "disk" or (d == "cpu" and "cpu" not in limits)}:
        raise PlanError("max_memory", f"the {config.model.dtype} model does not fit {limits}: "
                        f"{sum(spilled.values())} blocks would go to {', '.join(spilled)}; raise the limits, add GPUs "
                        "or a cpu entry (offloading)")
    return dict(counts)


def placement_lines(counts: dict[str, int]) -> list[str]:
    return ["placement under model.max_memory: " + ", ".join(
        f"{'GPU ' + d if d.isdigit() else d} {n} blocks" for d, n in sorted(counts.items()))] if counts else []
