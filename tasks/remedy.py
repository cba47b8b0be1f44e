"""Remedy step: for a recipe of a finished run, which quantized modules cause its drift against the run's cached
reference, and the fewest of them kept in high precision for it to pass its warn thresholds within a bytes budget
(quantgate.attribution). Its recipe is gated for real by the quantize and validate steps (`quantgate remedy`)."""
from __future__ import annotations

import json
from pathlib import Path

from quantgate import attribution, modeling
from quantgate.backends import RecipeBase
from quantgate.config import ConfigError, RunConfig, load_config
from quantgate.files import cached_tensors
from quantgate.loading import load_saved
from quantgate.results import Remedied


def facts(run_dir: Path, name: str) -> tuple:
    """The run's config and record, the recipe, its checkpoint and the reference's cached validation: a clear error,
    before any model is loaded, for a recipe it cannot remedy."""
    config, metrics = load_config(run_dir / "config.yaml"), json.loads((run_dir / "metrics.json").read_text())
    names = [r.name for r in config.recipes]
    if name not in names:
        raise ConfigError(run_dir / "config.yaml", "recipes", f"{name!r} is not in this run; allowed: {', '.join(names)}")
    checkpoint = metrics["recipes"].get(name, {}).get("quantize", {}).get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise ConfigError(run_dir / "metrics.json", f"recipes.{name}.quantize.checkpoint",
                          f"{checkpoint or 'none'}: no saved checkpoint to remedy (its quantize step did not save one)")
    stats = cached_tensors(Path(metrics["reference"]["validate"]["path"]))
    if stats is None:
        raise ConfigError(run_dir / "metrics.json", "reference.validate.path", f"{metrics['reference']['validate']['path']}"
                          " is gone or unreadable; run the config again to measure it")
    return config, metrics, config.recipes[names.index(name)], Path(checkpoint), stats


def remedy(config: RunConfig, metrics: dict, recipe: RecipeBase, checkpoint: Path, stats: dict, top: int = 8,
           budget_ratio: float = 0.5) -> Remedied:
    """Attribution and the search, on a run's facts (`facts`); `budget_ratio` of the reference's real bytes bounds
    what the recipe may keep."""
    reference_entry = metrics["reference"]
    device, dtype = modeling.resolve_device(config.model.device), reference_entry["compute_dtype"]
    reference = modeling.load(metrics["model"]["checkpoint"], dtype, device)
    quantized = load_saved(checkpoint, recipe, device, dtype)
    found = attribution.attribute(reference, quantized, stats, config.model.dtype, top)
    budget = int(budget_ratio * reference_entry["real_bytes"])
    tried = attribution.search(reference, quantized, stats, found, recipe.thresholds, budget, config.model.dtype)
    remedied = None
    if tried["kept"]:
        remedied = recipe.model_copy(update={"name": f"{recipe.name}-remedy", "skip": [*recipe.skip, *tried["kept"]],
                                             "description": f"{recipe.description}; {len(tried['kept'])} modules kept "
                                                            "in high precision by quantgate remedy"})
    return Remedied(attribution=found, search=tried, recipe=remedied.model_dump(mode="json") if remedied else None)
