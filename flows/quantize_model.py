"""The quantize-model flow: download → reference → for each recipe: quantize → validate → evaluate
→ benchmark → publish. Tasks pass paths; one recipe failing leaves the others running, and a
recipe stops at its first step that does not end ok."""
from __future__ import annotations

from prefect import flow

from quantgate import history
from quantgate.config import DEFAULT_CONFIG, load_config
from quantgate.record import RunRecord, run_step
from tasks.benchmark import benchmark_task
from tasks.download import download_task
from tasks.evaluate import evaluate_task
from tasks.publish import create_artifacts, publish_task
from tasks.quantize import make_plans, quantize_task
from tasks.reference import reference_task
from tasks.validate import validate_task


def publish(run: RunRecord, settings, recipe: str) -> None:
    run.set_step(recipe, "publish", run_step(publish_task, settings, run_dir=str(run.dir), recipe=recipe,
                                             settings=settings.model_dump()))


@flow(name="quantize-model")
def quantize_model(config_path: str = str(DEFAULT_CONFIG), overrides: list[str] | None = None,
                   nightly_id: str | None = None) -> str:
    config = load_config(config_path, overrides or [])
    make_plans(config, config_path)  # bad skip patterns or block sizes stop here, before any download
    run = RunRecord(config, config_path, nightly_id)
    model, steps = config.model, config.steps

    download = run_step(download_task, steps.download, source=model.source, revision=model.revision,
                        cache_dir=str(config.output.cache_dir), dtype=model.dtype)
    run.set_model(download)
    if download["status"] == "ok":
        reference = run_step(reference_task, steps.validate, checkpoint=download["checkpoint"],
                             checkpoint_sha256=download["checkpoint_sha256"], dtype=model.dtype,
                             device=model.device, cache_dir=str(config.output.cache_dir),
                             validate_settings=steps.validate.model_dump(),
                             evaluate_settings=steps.evaluate.model_dump())
        run.set_reference(reference)
        reference_benchmark = run_step(benchmark_task, steps.benchmark, name="reference",
                                       checkpoint=download["checkpoint"], recipe=None, dtype=model.dtype,
                                       device=model.device, settings=steps.benchmark.model_dump(),
                                       out_dir=str(run.dir / "reference"))
        run.set_reference_benchmark(reference_benchmark)
        for recipe in config.recipes:
            quantized = run_step(quantize_task, steps.quantize, checkpoint=download["checkpoint"],
                                 recipe=recipe.model_dump(mode="json"), dtype=model.dtype, device=model.device,
                                 out_dir=str(run.recipe_dir(recipe.name)),
                                 roundtrip_min_top1=steps.quantize.roundtrip_min_top1)
            run.set_step(recipe.name, "quantize", quantized)
            if quantized["status"] != "ok":
                continue
            validated = run_step(validate_task, steps.validate, checkpoint=quantized["checkpoint"],
                                 recipe=recipe.model_dump(mode="json"), reference=reference["validate"],
                                 device=model.device, settings=steps.validate.model_dump()) \
                if reference["status"] == "ok" else {"status": "error", "reason": f"reference: {reference['reason']}"}
            run.set_step(recipe.name, "validate", validated)
            if validated["status"] == "failed" and steps.publish.force:
                publish(run, steps.publish, recipe.name)
            if validated["status"] != "ok":
                continue
            evaluated = run_step(evaluate_task, steps.evaluate, checkpoint=quantized["checkpoint"],
                                 recipe=recipe.model_dump(mode="json"), reference=reference["evaluate"],
                                 device=model.device, settings=steps.evaluate.model_dump(),
                                 cache_dir=str(config.output.cache_dir), out_dir=str(run.recipe_dir(recipe.name)))
            run.set_step(recipe.name, "evaluate", evaluated)
            if evaluated["status"] != "ok":
                continue
            benchmarked = run_step(benchmark_task, steps.benchmark, name=recipe.name, checkpoint=download["checkpoint"],
                                   recipe=recipe.model_dump(mode="json"), dtype=model.dtype, device=model.device,
                                   settings=steps.benchmark.model_dump(), out_dir=str(run.recipe_dir(recipe.name)),
                                   reference=reference_benchmark if reference_benchmark["status"] == "ok" else None)
            run.set_step(recipe.name, "benchmark", benchmarked)
            if benchmarked["status"] != "ok":
                continue
            publish(run, steps.publish, recipe.name)
    run.finish()
    history.record_run(config.output.history_db, run.dir)
    create_artifacts(str(run.dir))
    return str(run.dir)
