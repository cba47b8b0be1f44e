"""The remedy flow: for a recipe that warns or fails, which modules cause its drift and the variant of it that passes,
each variant quantized and validated as a recipe of the run is (tasks/remedy.py). quantize-model runs it for the
recipes `steps.remedy` names; the `remedy` deployment runs it on a finished run's folder."""
from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.states import Failed

from flows.devices import device_limits
from flows.steps import quantize_task, run_step, validate_task
from flows.workers import in_worker
from quantgate import modeling
from quantgate.backends import RecipeBase
from quantgate.config import RunConfig
from quantgate.files import write_json
from quantgate.results import Quantized, ReferenceValidation, Remedied, Validated
from quantgate.settings import RemedySettings
from tasks import remedy as step

remedy_task = task(in_worker(step.remedy), name="remedy", task_run_name="remedy-{recipe.name}")


def remedy_recipe(run_dir: Path, config: RunConfig, metrics: dict, recipe: RecipeBase, settings: RemedySettings) -> Remedied:
    """Attribution, then the variants through the quantize and validate tasks (<recipe>/remedy/<number>) until one
    passes: <recipe>/remedy.yaml."""
    hold = device_limits(config.model, modeling.placement(config.model.device, config.model.max_memory))
    found = run_step(remedy_task, settings, Remedied, recipe.name, "remedy", hold, config=config, metrics=metrics,
                     recipe=recipe, top=settings.top, budget_ratio=settings.budget)
    if not found.ok:
        return found
    out, steps = run_dir / recipe.name, config.steps
    reference = ReferenceValidation(**metrics["reference"]["validate"])

    def quantized(variant: RecipeBase, number: int) -> Quantized:
        return run_step(quantize_task, steps.quantize, Quantized, variant.name, f"quantize {number}", hold,
                        checkpoint=metrics["model"]["checkpoint"], recipe=variant, dtype=config.model.dtype,
                        device=config.model.device, out_dir=str(out / "remedy" / str(number)),
                        roundtrip_min_top1=steps.quantize.roundtrip_min_top1)

    def validated(variant: RecipeBase, checkpoint: Quantized) -> Validated:
        return run_step(validate_task, steps.validate, Validated, variant.name, "validate", hold,
                        checkpoint=checkpoint.checkpoint, recipe=variant, reference=reference, device=config.model.device,
                        settings=steps.validate, compute_dtype=metrics["reference"]["compute_dtype"],
                        served=config.model.dtype)

    gated = step.gate(found.variants, quantized, validated, found.budget)
    return step.conclude(found, gated, config, out / "remedy.yaml", f"quantgate remedy {run_dir} {recipe.name}")


@flow(name="remedy")
def remedy_run(run_dir: str, recipe: str, top: int = 8, budget: float = 0.5) -> str | Failed:
    """The remedy of one recipe of a finished run: <recipe>/remedy.json, and remedy.yaml where a variant passed."""
    config, metrics, chosen = step.facts(Path(run_dir), recipe)
    settings = config.steps.remedy.model_copy(update={"top": top, "budget": budget})
    found = remedy_recipe(Path(run_dir), config, metrics, chosen, settings)
    write_json(Path(run_dir) / recipe / "remedy.json", found.model_dump(mode="json"))
    if found.file:
        return found.file
    return Failed(message=f"{recipe}: {found.reason}", data=json.dumps(found.gated))
