"""The quantize-model flow: download → reference → for each recipe: quantize → validate → evaluate
→ benchmark → publish. Tasks pass paths; one recipe failing leaves the others running, and a
recipe stops at its first step that does not end ok. Everything the libraries print goes to the
run's log (runs/<run_id>/run.log)."""
from __future__ import annotations

from prefect import flow

from quantgate import history, modeling, runlog
from quantgate.config import DEFAULT_CONFIG, RecipeBase, RunConfig, load_config, writable
from quantgate.plan import make_plans
from quantgate.record import RunRecord, run_step
from tasks.benchmark import benchmark_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.publish import create_artifacts, publish_task
from tasks.quantize import quantize_task
from tasks.reference import reference_task
from tasks.validate import nonfinite_reason, validate_task


@flow(name="quantize-model")
def quantize_model(config_path: str = str(DEFAULT_CONFIG), overrides: list[str] | None = None,
                   nightly_id: str | None = None) -> str:
    config = load_config(config_path, overrides or [])
    make_plans(config, config_path)  # bad skip patterns or block sizes stop here, before any download
    writable(config, config_path)  # an unwritable runs, cache or history path stops here, not after every step
    run = RunRecord(config, config_path, nightly_id)
    try:
        with runlog.stop_on_signals(), runlog.to_file(run.dir / "run.log"):
            model = gate_model(run, config)
            for recipe in config.recipes if model else []:
                gate_recipe(run, config, model, recipe)
            run.finish()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through stop_on_signals
        run.interrupt(str(stop) or "SIGINT")
        history.record_run(config.output.history_db, run.dir)
        raise
    history.record_run(config.output.history_db, run.dir)
    create_artifacts(str(run.dir))
    return str(run.dir)


def gate_model(run: RunRecord, config: RunConfig) -> dict | None:
    """Download, measure the reference once, benchmark it: what every recipe is compared with."""
    model, steps, cache = config.model, config.steps, str(config.output.cache_dir)
    download = run_step(download_task, steps.download, "model", "download", source=model.source,
                        revision=model.revision, cache_dir=cache, dtype=model.dtype)
    run.set_model(download)
    if download["status"] != "ok":
        return None
    compute = modeling.compute_dtype(model.dtype, model.device, model.compute_dtype)
    device = modeling.placement(model.device, model.max_memory)  # one GPU, several, or the CPU: every step's
    reference = run_step(reference_task, steps.reference, "model", "reference", checkpoint=download["checkpoint"],
                         checkpoint_sha256=download["checkpoint_sha256"], dtype=model.dtype, compute_dtype=compute,
                         device=device, cache_dir=cache, validate_settings=steps.validate.model_dump(),
                         evaluate_settings=steps.evaluate.model_dump())
    run.set_reference(reference)
    if reference["status"] != "ok":
        return None  # nothing to compare a recipe with: the run's error (run.finish)
    if broken := reference["validate"].get("nonfinite"):
        run.set_base_broken(f"the base model is broken: its unquantized {nonfinite_reason(broken)}")
        return None
    benchmark = run_step(benchmark_task, steps.benchmark, "model", "benchmark", name="reference",
                         checkpoint=download["checkpoint"], recipe=None, dtype=model.dtype, device=device,
                         settings=steps.benchmark.model_dump(), out_dir=str(run.dir / "reference"),
                         cache_dir=cache)
    run.set_reference_benchmark(benchmark)
    return {"checkpoint": download["checkpoint"], "compute_dtype": compute, "reference": reference, "device": device,
            "benchmark": benchmark if benchmark["status"] == "ok" else None}


def gate_recipe(run: RunRecord, config: RunConfig, model: dict, recipe: RecipeBase) -> None:
    """One recipe through the steps, stopping at the first that does not end ok."""
    steps, device, name = config.steps, model["device"], recipe.name
    spec, out, cache = recipe.model_dump(mode="json"), str(run.recipe_dir(name)), str(config.output.cache_dir)
    reference = model["reference"]
    quantized = run_step(quantize_task, steps.quantize, name, "quantize", checkpoint=model["checkpoint"], recipe=spec,
                         dtype=config.model.dtype, device=device, out_dir=out,
                         roundtrip_min_top1=steps.quantize.roundtrip_min_top1,
                         cache_dir=cache, registry_dir=str(steps.publish.registry_dir))
    if not run.set_step(name, "quantize", quantized):
        return
    validated = run_step(validate_task, steps.validate, name, "validate", checkpoint=quantized["checkpoint"],
                         recipe=spec, reference=reference["validate"], device=device,
                         settings=steps.validate.model_dump(), compute_dtype=model["compute_dtype"])
    if not run.set_step(name, "validate", validated):
        if validated["status"] == "failed" and steps.publish.force:
            publish(run, config, name)
        return
    evaluated = run_step(evaluate_task, steps.evaluate, name, "evaluate", checkpoint=quantized["checkpoint"],
                         recipe=spec, reference=reference["evaluate"], device=device,
                         settings=steps.evaluate.model_dump(), cache_dir=cache, out_dir=out,
                         compute_dtype=model["compute_dtype"])
    if not run.set_step(name, "evaluate", evaluated):
        return
    benchmarked = run_step(benchmark_task, steps.benchmark, name, "benchmark", name=name,
                           checkpoint=quantized["checkpoint"], recipe=spec, dtype=config.model.dtype, device=device,
                           settings=steps.benchmark.model_dump(), out_dir=out, reference=model["benchmark"],
                           base_checkpoint=model["checkpoint"], cache_dir=cache)
    if run.set_step(name, "benchmark", benchmarked):
        publish(run, config, name)


def publish(run: RunRecord, config: RunConfig, recipe: str) -> None:
    settings = config.steps.publish
    run.set_step(recipe, "publish", run_step(publish_task, settings, recipe, "publish", run_dir=str(run.dir),
                                             recipe=recipe, settings=settings.model_dump()))
