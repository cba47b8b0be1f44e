"""The quantize-model flow: download → reference → the reference's benchmark, then for each recipe
(`model.recipes_at_once` at a time, each then in a worker process of its own, the reference's steps beside them and
each recipe waiting for the reference after its quantize, making its own generations meanwhile: flows.workers):
quantize → (generate) → validate (→ remedy where it warns or fails and steps.remedy is on) → adapters (where the
config serves any) → evaluate → benchmark → publish. Each step is a plain function of tasks/ run as a Prefect task
(flows.steps); one recipe failing leaves the others running, and a recipe stops at its first step that does not end
ok. Everything the libraries print goes to the run's log (runs/<run_id>/run.log)."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prefect import State, flow
from prefect.states import Failed
from prefect.logging.handlers import APILogHandler

from flows.approval import ask
from flows.artifacts import create_artifacts
from flows.devices import Devices, device_limits
from flows.remedy import remedy_recipe
from flows.steps import (adapters_task, benchmark_task, download_task, evaluate_task, generate_task, publish_task,
                         quantize_task, reference_task, run_step, validate_task)
from flows.workers import each_recipe, free_cached_memory, leave_worker, renew_worker
from quantgate import history, modeling, runlog
from quantgate.backends import RecipeBase
from quantgate.config import RunConfig, load_config, writable
from quantgate.nonfinite import nonfinite_reason, overflow_reason
from quantgate.paths import DEFAULT_CONFIG
from quantgate.plan import make_plans
from quantgate.record import RunRecord
from quantgate.results import (AdaptersChecked, Benchmarked, Downloaded, Evaluated, Generated, Published, Quantized,
                               Reference, Validated)
from quantgate.settle import settle
from tasks.benchmark import compared
from tasks.benchmark import prepare as prepare_measurements

log = logging.getLogger("quantgate.progress")


@dataclass
class Model:
    """What every recipe of the run is compared with: the reference checkpoint, measured once."""
    download: Downloaded
    compute_dtype: str
    device: str | dict
    hold: Devices  # the devices its steps hold while they compute (flows.devices)
    reference: Reference | None = None  # once measured, where it went ok and the base is sound
    referenced: threading.Event = field(default_factory=threading.Event)
    benchmark: Benchmarked | None = None  # once benchmarked, where it went ok
    benchmarked: threading.Event = field(default_factory=threading.Event)

    @property
    def checkpoint(self) -> str:
        return self.download.checkpoint

    def reference_result(self) -> Reference | None:
        """The reference, waited for where it is measured beside the recipes; None: nothing to compare with."""
        wait_for(self.referenced)
        return self.reference

    def without_reference(self) -> bool:
        """Whether the reference is known already to have left nothing to compare with."""
        return self.referenced.is_set() and self.reference is None

    def reference_benchmark(self) -> Benchmarked | None:
        """The reference's benchmark, waited for where it runs beside the recipes."""
        wait_for(self.benchmarked)
        return self.benchmark

    def reference_benchmark_now(self) -> Benchmarked | None:
        """The reference's benchmark where it has ended ok; None where it has not ended (yet)."""
        return self.benchmark if self.benchmarked.is_set() else None


def wait_for(event: threading.Event) -> None:
    while not event.wait(0.5):
        runlog.raise_if_signalled()


@flow(name="quantize-model")
def quantize_model(config_path: str = str(DEFAULT_CONFIG), overrides: list[str] | None = None,
                   nightly_id: str | None = None) -> str | State:
    config = load_config(config_path, overrides or [])
    make_plans(config, config_path)  # bad skip patterns or block sizes stop here, before any download
    writable(config, config_path)  # an unwritable runs, cache or history path stops here, not after every step
    settle(config.output.runs_dir, config.output.history_db, config.steps.publish.registry_dir)  # killed runs' leftovers
    run = RunRecord(config, config_path, nightly_id)
    try:
        with runlog.stop_on_signals(), runlog.to_file(run.dir / "run.log", ui=APILogHandler()):
            model = prepare_model(run, config)
            awaiting: list[str] = []  # recipes whose Hub upload waits for a reviewer: asked once every recipe is gated
            each_recipe(config.recipes if model else [], config.model.recipes_at_once,
                        lambda recipe: gate_recipe(run, config, model, recipe, awaiting),
                        first=model and (lambda: measure_model(run, config, model)))
            for name in awaiting:
                publish_approved(run, config, name)
            runlog.raise_if_signalled()  # told to stop after the last step began: interrupted, not passed
            run.finish()
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM through stop_on_signals
        run.interrupt(str(stop) or "SIGINT")
        history.record_run(config.output.history_db, run.dir)
        raise
    history.record_run(config.output.history_db, run.dir)
    create_artifacts(run.dir)
    return outcome(run)


def outcome(run: RunRecord) -> str | State:
    """The run folder; a run that did not pass ends Failed in Prefect, as its record says, the folder its data."""
    if run.metrics["status"] == "passed":
        return str(run.dir)
    return Failed(message=f"run {run.run_id}: {run.metrics['status']}: {run.metrics.get('reason') or 'see report.md'}",
                  data=str(run.dir))


def prepare_model(run: RunRecord, config: RunConfig) -> Model | None:
    """The download, and where the model's and the recipes' steps compute."""
    model, cache = config.model, str(config.output.cache_dir)
    download = run_step(download_task, config.steps.download, Downloaded, "model", "download", source=model.source,
                        revision=model.revision, cache_dir=cache, dtype=model.dtype)
    run.set_model(download)
    if not download.ok:
        return None
    prepare_measurements()  # the first benchmark's process, importing while the reference and recipes start
    compute = modeling.compute_dtype(model.dtype, model.device, model.compute_dtype)
    device = modeling.placement(model.device, model.max_memory)  # one GPU, several, or the CPU: every step's
    hold = device_limits(model, device)
    at_once = min(model.recipes_at_once, len(config.recipes))
    wanted = at_once + (at_once > 1)  # side by side, the reference's steps run beside the first recipes
    if hold.names and hold.slots < wanted:
        log.warning("model.recipes_at_once is %d but model.device_slots %d: the recipes' steps on %s take turns; "
                    "set model.device_slots to %d for them to compute at once (the reference's steps with them)",
                    model.recipes_at_once, hold.slots, hold, wanted)
    return Model(download, compute, device, hold)


def measure_model(run: RunRecord, config: RunConfig, model: Model) -> None:
    """The reference step, then its benchmark: before the recipes, or beside them, where the recipes quantize before
    they wait for it."""
    try:
        model.reference = measure_reference(run, config, model)
    finally:
        model.referenced.set()
        if model.reference is None:  # no benchmark follows: a recipe waiting for its figures goes on without them
            model.benchmarked.set()
    if model.reference is not None:
        leave_worker()  # side by side: the reference's worker ends with its step
        free_cached_memory()  # one at a time: its GPU memory, cached here, back before its benchmark loads it again
        benchmark_reference(run, config, model)


def measure_reference(run: RunRecord, config: RunConfig, model: Model) -> Reference | None:
    """The reference, measured once: what every recipe is compared with; None where it did not end ok or the base
    model itself is broken."""
    steps = config.steps
    reference = run_step(reference_task, steps.reference, Reference, "model", "reference", model.hold,
                         download=model.download, dtype=config.model.dtype, compute_dtype=model.compute_dtype,
                         device=model.device, cache_dir=str(config.output.cache_dir), validate=steps.validate,
                         evaluate=steps.evaluate, adapters_served=config.adapters)
    run.set_reference(reference)
    if not reference.ok:
        return None  # nothing to compare a recipe with: the run's error (run.finish)
    if broken := reference.validate.nonfinite:
        run.set_base_broken(f"the base model is broken: its unquantized {nonfinite_reason(broken)}")
        return None
    if overflow := reference.validate.overflow:
        run.set_base_broken(f"the base model is broken where it is served: {overflow_reason(overflow)}")
        return None
    return reference


def benchmark_reference(run: RunRecord, config: RunConfig, model: Model) -> None:
    """The reference's benchmark, what each recipe's is compared with: before the recipes, or beside them."""
    try:
        steps = config.steps
        benchmark = run_step(benchmark_task, steps.benchmark, Benchmarked, "model", "benchmark", model.hold,
                             name="reference", checkpoint=model.checkpoint, recipe=None, dtype=config.model.dtype,
                             device=model.device, settings=steps.benchmark, out_dir=str(run.dir / "reference"),
                             cache_dir=str(config.output.cache_dir))
        run.set_reference_benchmark(benchmark)
        model.benchmark = benchmark if benchmark.ok else None
    finally:
        model.benchmarked.set()  # a recipe waiting for it goes on, without the comparison where it did not end ok


def gate_recipe(run: RunRecord, config: RunConfig, model: Model, recipe: RecipeBase, awaiting: list[str]) -> None:
    """One recipe through the steps, stopping at the first that does not end ok."""
    steps, name, out, cache = config.steps, recipe.name, str(run.recipe_dir(recipe.name)), str(config.output.cache_dir)
    if model.without_reference():  # measured before the recipes, and nothing to compare with: the record says why
        return
    quantized = run_step(quantize_task, steps.quantize, Quantized, name, "quantize", model.hold, checkpoint=model.checkpoint,
                         recipe=recipe, dtype=config.model.dtype, device=model.device, out_dir=out,
                         roundtrip_min_top1=steps.quantize.roundtrip_min_top1, cache_dir=cache,
                         registry_dir=str(steps.publish.registry_dir))
    if not run.set_step(name, "quantize", quantized):
        return
    if generated := generate_meanwhile(config, model, recipe, quantized, out):
        run.set_generated(name, generated)
        if not generated.ok:
            renew_worker()  # validate in a new process: a device-side assert leaves a CUDA context unusable
    if (reference := model.reference_result()) is None:
        return
    validated = run_step(validate_task, steps.validate, Validated, name, "validate", model.hold, checkpoint=quantized.checkpoint,
                         recipe=recipe, reference=reference.validate, device=model.device,
                         settings=steps.validate, compute_dtype=model.compute_dtype, served=config.model.dtype,
                         generated=generated.path if generated and generated.ok else None)
    went_on = run.set_step(name, "validate", validated)
    if steps.remedy.enabled and validated.verdict in steps.remedy.verdicts:
        run.set_remedy(name, remedy_recipe(run.dir, config, run.snapshot(), recipe, steps.remedy))
    if not went_on:
        if validated.status == "failed" and steps.publish.force:
            publish(run, config, name, awaiting)
        return
    if reference.adapters and not run.set_adapters(name, run_step(
            adapters_task, steps.validate, AdaptersChecked, name, "adapters", model.hold, checkpoint=quantized.checkpoint,
            recipe=recipe, references=reference.adapters, base_stats=reference.validate.path,
            device=model.device, settings=steps.validate, compute_dtype=model.compute_dtype, served=config.model.dtype)):
        if steps.publish.force:
            publish(run, config, name, awaiting)
        return
    served = {n: a for n, a in (reference.adapters or {}).items() if "error" not in a}  # kept by this recipe
    evaluated = run_step(evaluate_task, steps.evaluate, Evaluated, name, "evaluate", model.hold, checkpoint=quantized.checkpoint,
                         recipe=recipe, reference=reference.evaluate, device=model.device,
                         settings=steps.evaluate, out_dir=out, compute_dtype=model.compute_dtype,
                         adapters_served={n: a for n, a in served.items() if a.get("evaluate")})
    if not run.set_step(name, "evaluate", evaluated):
        return
    # Not waited for: the reference's benchmark may still run; compared after, once no step holds the device.
    reference_now = model.reference_benchmark_now()
    benchmarked = run_step(benchmark_task, steps.benchmark, Benchmarked, name, "benchmark", model.hold, name=name,
                           checkpoint=quantized.checkpoint, recipe=recipe, dtype=config.model.dtype,
                           device=model.device, settings=steps.benchmark, out_dir=out, reference=reference_now,
                           base_checkpoint=model.checkpoint, cache_dir=cache,
                           adapters_served={n: a["folder"] for n, a in served.items()} if steps.benchmark.adapters else None)
    if reference_now is None:
        benchmarked = compared(benchmarked, model.reference_benchmark())
    if run.set_step(name, "benchmark", benchmarked):
        publish(run, config, name, awaiting)


def generate_meanwhile(config: RunConfig, model: Model, recipe: RecipeBase, quantized: Quantized,
                       out: str) -> Generated | None:
    """The recipe's own generations, made while the reference beside it is still measured (validate then only
    compares), a bet on time the recipe would spend waiting. None where the reference has ended, or validation makes
    none."""
    settings = config.steps.validate
    makes_some = settings.generate_prompts or (settings.long_context and settings.long_generations)
    if model.referenced.is_set() or not makes_some:
        return None
    return run_step(generate_task, settings, Generated, recipe.name, "generate", model.hold,
                    checkpoint=quantized.checkpoint, recipe=recipe, device=model.device, settings=settings, out_dir=out,
                    compute_dtype=model.compute_dtype)


def publish(run: RunRecord, config: RunConfig, recipe: str, awaiting: list[str]) -> None:
    """The publish step now, or, where a reviewer must approve a Hub upload, once every recipe is gated: no device
    and no recipe waits for a person."""
    settings = config.steps.publish
    if settings.approve and settings.target == "hub" and not settings.dry_run:
        awaiting.append(recipe)
        return
    run.set_step(recipe, "publish", run_step(publish_task, settings, Published, recipe, "publish", run_dir=str(run.dir),
                                             recipe=recipe, settings=settings))


def publish_approved(run: RunRecord, config: RunConfig, recipe: str) -> None:
    """The flow run paused until a reviewer approves the upload (flows.approval); rejected or unanswered, nothing is
    uploaded and the recipe says why."""
    settings = config.steps.publish
    # A recipe published with steps.publish.force failed validation: not publishing it leaves it failed.
    failed = run.metrics["recipes"][recipe]["status"] in ("failed", "error")
    try:
        approved, approval = ask(run.dir, recipe, settings.hub_repo, settings.approve_timeout_s)
    except Exception as e:  # Prefect's server unreachable, the pause refused: not published, and said why
        run.set_step(recipe, "publish", Published(status="not_run" if failed else "error",
                                                  reason=f"approval: {type(e).__name__}: {e}"))
        return
    if not approved:
        run.set_step(recipe, "publish", Published(status="not_run" if failed else "skipped", reason=approval))
        return
    published = run_step(publish_task, settings, Published, recipe, "publish", run_dir=str(run.dir), recipe=recipe,
                         settings=settings)
    published.approval = approval if published.ok else None
    run.set_step(recipe, "publish", published)
