"""Remedy step: for a recipe of a finished run that warns or fails, what would pass. Which quantized modules cause its
drift against the run's cached reference (quantgate.attribution), and the variants its backend can express, cheapest
first: its failing towers kept with their projectors, finer blocks or groups, the fewest modules kept in high
precision for the drift to pass within a bytes budget. `gate` runs each through a quantize and a validate (given to
it, so the command line calls the steps and the flow their tasks) until one passes."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from quantgate import attribution, modeling
from quantgate.backends import RecipeBase, backend_of, parse_recipe
from quantgate.config import ConfigError, RunConfig, dump_config, load_config
from quantgate.files import cached_tensors, write_atomic
from quantgate.loading import load_saved
from quantgate.plan import with_projectors
from quantgate.results import Quantized, Remedied, Validated


def facts(run_dir: Path, name: str) -> tuple:
    """The run's config and record, the recipe and its checkpoint: a clear error, before any model is loaded, for a
    recipe it cannot remedy (the reference's cached validation gone included)."""
    config, metrics = load_config(run_dir / "config.yaml"), json.loads((run_dir / "metrics.json").read_text())
    names = [r.name for r in config.recipes]
    if name not in names:
        raise ConfigError(run_dir / "config.yaml", "recipes", f"{name!r} is not in this run; allowed: {', '.join(names)}")
    checkpoint = metrics["recipes"].get(name, {}).get("quantize", {}).get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ConfigError(run_dir / "metrics.json", f"recipes.{name}.quantize.checkpoint",
                          f"{checkpoint or 'none'}: no saved checkpoint to remedy (its quantize step did not save one)")
    if cached_tensors(Path(metrics["reference"]["validate"]["path"])) is None:
        raise ConfigError(run_dir / "metrics.json", "reference.validate.path", f"{metrics['reference']['validate']['path']}"
                          " is gone or unreadable; run the config again to measure it")
    return config, metrics, config.recipes[names.index(name)]


def remedy(config: RunConfig, metrics: dict, recipe: RecipeBase, top: int = 8, budget_ratio: float = 0.5) -> Remedied:
    """Attribution and the search where the text drift does not pass, and the variants to gate, from the run's
    record (`metrics`, as the flow keeps it); `budget_ratio` of the reference's real bytes bounds what a variant
    may keep."""
    entry, budget = metrics["recipes"][recipe.name], int(budget_ratio * metrics["reference"]["real_bytes"])
    found = tried = None
    if not attribution.passes(drift_recorded(entry.get("validate", {})), recipe.thresholds):
        stats, checkpoint = cached_tensors(Path(metrics["reference"]["validate"]["path"])), entry["quantize"]["checkpoint"]
        device, dtype = modeling.resolve_device(config.model.device), metrics["reference"]["compute_dtype"]
        reference = modeling.load(metrics["model"]["checkpoint"], dtype, device)
        quantized = load_saved(checkpoint, recipe, device, dtype)
        found = attribution.attribute(reference, quantized, stats, config.model.dtype, top)
        tried = attribution.search(reference, quantized, stats, found, recipe.thresholds, budget, config.model.dtype)
    return Remedied(attribution=found, search=tried, variants=variants(recipe, entry, tried), budget=budget)


def drift_recorded(validated: dict) -> dict:
    """The text prompts' drift as validate recorded it (None where it measured none)."""
    return {k: validated.get(k) for k in ("kl_mean", "kl_p99")} | {"top1_agreement": validated.get("top1_agreement", 0)}


def kept_towers(entry: dict) -> list[str]:
    """The towers whose own verdict is not a pass, each with the projectors beside it."""
    found = list(entry.get("quantize", {}).get("towers", {}))
    failing = [t for t, m in (entry.get("validate", {}).get("towers") or {}).items() if m.get("verdict") != "pass"]
    return list(dict.fromkeys(name for tower in failing for name in with_projectors(tower, found)))


def variants(recipe: RecipeBase, entry: dict, search: dict | None) -> list[dict]:
    """What to gate, in order: the failing towers kept; then (where the text drift fails) each finer block or group
    size the backend offers, and the modules the search kept; every one on top of the towers kept."""
    towers = [t for t in kept_towers(entry) if t not in recipe.skip]
    skip, said = [*recipe.skip, *towers], [f"keep {', '.join(towers)}"] if towers else []
    changes = [(said, {"skip": skip})] if towers else []
    if search is not None:
        changes += [([*said, change], {"skip": skip, **fields}) for change, fields in backend_of(recipe).finer(recipe)]
        if search["kept"]:
            many = len(search["kept"])
            changes.append(([*said, f"keep {many} module{'s' * (many > 1)}"], {"skip": [*skip, *search["kept"]]}))
    return [{"change": "; ".join(words), "recipe": variant(recipe, "; ".join(words), fields)} for words, fields in changes]


def variant(recipe: RecipeBase, change: str, fields: dict) -> dict:
    made = recipe.model_copy(update={"name": f"{recipe.name}-remedy", **fields,
                                     "description": f"{recipe.description}; {change} (quantgate remedy)"})
    return parse_recipe(made.model_dump(mode="json")).model_dump(mode="json")  # the changed fields validated


def gate(variants: list[dict], quantize: Callable[[RecipeBase, int], Quantized],
         validate: Callable[[RecipeBase, Quantized], Validated], budget: int) -> dict:
    """Each variant quantized (`quantize(recipe, its number)`) and validated for real until one passes; one whose
    checkpoint is over `budget` bytes is not validated. Every one tried, with its bytes, KL, top-1 and verdict."""
    rows, chosen = [], None
    for number, candidate in enumerate(variants, 1):
        recipe = parse_recipe(candidate["recipe"])
        quantized = quantize(recipe, number)
        row = {"variant": number, "change": candidate["change"], "bytes": quantized.real_bytes}
        if not quantized.ok or quantized.real_bytes > budget:
            row["verdict"] = f"over the budget of {budget:,} bytes" if quantized.ok else \
                f"not validated: {quantized.status}: {quantized.reason}"
        else:
            validated = validate(recipe, quantized)
            measured = validated.model_dump()
            row |= {k: measured.get(k) for k in ("kl_mean", "kl_p99", "top1_agreement")}
            row["verdict"] = validated.verdict or f"{validated.status}: {validated.reason}"
        rows.append(row)
        if row["verdict"] == "pass":
            chosen = number
            break
    return {"tried": rows, "chosen": chosen, "budget": budget}


def write_recipe(path: Path, config: RunConfig, recipe_fields: dict, header: str) -> RecipeBase:
    """The run's config with the remedied recipe alone, as a file `quantgate run` takes; the recipe as read back."""
    import yaml

    listed = "".join("  " + line if i else "- " + line for i, line in
                     enumerate(yaml.safe_dump(recipe_fields, sort_keys=False).splitlines(keepends=True)))
    text = dump_config(config.model_copy(update={"recipes": []})).replace("recipes: []\n", "recipes:\n" + listed)
    write_atomic(path, f"# {header}\n{text}")
    return load_config(path).recipes[0]


def conclude(found: Remedied, gated: dict, config: RunConfig, path: Path, header: str) -> Remedied:
    """The gate's outcome on the remedy: the recipe that passed written to `path` (a config `quantgate run` takes),
    or the remedy failed, saying why."""
    found.gated = gated
    if gated["chosen"] is None:
        found.status = "failed"
        found.reason = unremedied(found, gated)
        return found
    found.recipe = found.variants[gated["chosen"] - 1]["recipe"]
    write_recipe(path, config, found.recipe, header)
    found.file = str(path)
    return found


def unremedied(found: Remedied, gated: dict) -> str:
    """Why no variant passed, in a sentence."""
    if found.search is None and not found.variants:
        return "nothing to try: the text drift and every tower pass"
    stopped = (found.search or {}).get("over_budget_at")
    return (f"no variant passed within {gated['budget']:,} bytes ({len(gated['tried'])} quantized and validated)"
            + (f"; the search stopped where keeping {stopped} modules would go over it" if stopped else ""))
