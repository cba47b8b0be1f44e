"""The steps as Prefect tasks: each library step (tasks/) wrapped with its name, its run names and, for the
download, its cache; timeouts and retries come from the step's settings. `run_step` runs one and turns any way it
can end (a result, a timeout, an exception) into the step's typed result."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from flows.devices import TIMED, Devices, Hold
from flows.workers import in_worker
from quantgate.fetching import intact, manifest_path
from quantgate.results import StepResult
from quantgate.runlog import SHOWN, announce, raise_if_signalled
from quantgate.sources import DownloadError, parse_source
from tasks.adapters import check_adapters
from tasks.benchmark import benchmark
from tasks.download import download
from tasks.evaluate import evaluate
from tasks.publish import publish
from tasks.quantize import quantize
from tasks.reference import reference
from tasks.validate import generate, validate

log = logging.getLogger("quantgate.download")


def download_cache_key(context: TaskRunContext, parameters: dict) -> str | None:
    """Keyed on source and revision; no key (so the task runs) when the cached files are damaged."""
    source = parse_source(parameters["source"], parameters.get("revision"))
    cache_dir = Path(parameters["cache_dir"])
    problems = intact(source, cache_dir)
    if problems and not manifest_path(source, cache_dir).exists():
        log.info("%s is not in the cache %s yet: fetching it", source.text, cache_dir, extra=SHOWN)
        return None
    if problems:
        log.warning("cached checkpoint for %s not usable, fetching again: %s", source.text, "; ".join(problems))
        return None
    # Where the cache lives is part of the key: two configs with different cache_dir never share a checkpoint.
    key = f"download:{source.text}@{source.revision}:{parameters['dtype']}:{cache_dir.resolve()}"
    return hashlib.sha256(key.encode()).hexdigest()  # Prefect stores results under this name


def download_as_data(source: str, revision: str | None, cache_dir: str, dtype: str) -> dict:
    # Stored as JSON data: a result file in Prefect's storage is never a pickle (or a class) to load.
    return download(source, revision, cache_dir, dtype).model_dump(mode="json", exclude_unset=True)


def transient(task, task_run, state) -> bool:
    """Whether a failed download may succeed if tried again: a damaged local folder, a fake GGUF or a link out
    of the checkpoint stays as it is (DownloadError), a network error may not."""
    return not isinstance(state.result(raise_on_failure=False), DownloadError)


download_task = task(download_as_data, name="download", cache_key_fn=download_cache_key, persist_result=True,
                     result_serializer="json", retry_delay_seconds=10, retry_condition_fn=transient)
# The model steps: in the recipe's worker process where recipes are gated side by side (flows.workers).
reference_task = task(in_worker(reference), name="reference")
quantize_task = task(in_worker(quantize), name="quantize", task_run_name="quantize-{recipe.name}")
generate_task = task(in_worker(generate), name="generate", task_run_name="generate-{recipe.name}")
validate_task = task(in_worker(validate), name="validate", task_run_name="validate-{recipe.name}")
adapters_task = task(in_worker(check_adapters), name="adapters", task_run_name="adapters-{recipe.name}")
evaluate_task = task(in_worker(evaluate), name="evaluate", task_run_name="evaluate-{recipe.name}")
# Here, not in a worker: it loads nothing itself, and asks this process for the device alone (Hold.alone) as it times;
# no cache key: that request, a function, is one of its inputs.
benchmark_task = task(benchmark, name="benchmark", task_run_name="benchmark-{name}", cache_policy=NO_CACHE)
publish_task = task(publish, name="publish", task_run_name="publish-{recipe}")


def run_step(step_task, settings, result_type: type[StepResult], group: str, step: str, /, hold: Devices = Devices(),
             **params) -> StepResult:
    """Run a step's task under its settings' timeout and retries, holding the devices named in `hold`
    (flows.devices), announcing its start and end (group is the recipe, or `model`); any way it ends becomes its
    typed result, never a raise."""
    raise_if_signalled()
    announce(group, step, "start")
    devices = contextlib.ExitStack()
    try:
        holding = devices.enter_context(Hold(hold, group, step))
    except Exception as e:  # the device's limit could not be had (Prefect's server gone, the limit deleted)
        result = result_type(status="error", reason=f"holding {hold}: {type(e).__name__}: {e}")
        announce(group, step, "end", result.status, 0.0, result.reason)
        return result
    try:
        started_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        t0 = time.perf_counter()
        timeout = settings.timeout_s
        if step in TIMED:  # it waits for the device alone inside its task: each of its processes has the timeout
            params["alone"], timeout = holding.alone, None
        state = step_task.with_options(timeout_seconds=timeout, retries=settings.retries)(**params, return_state=True)
        seconds = round(time.perf_counter() - t0, 2)
    finally:
        try:
            devices.close()
        except Exception as e:  # the step's work is done; an unreleased slot's lease ends by itself
            logging.getLogger("quantgate.progress").warning("%s: %s: releasing %s: %s: %s", group, step,
                                                            hold, type(e).__name__, e)
    raise_if_signalled()  # the step ended, but the run was told to stop while it ran
    if state.is_completed():
        result = state.result()
        result = result_type.model_validate(result) if isinstance(result, dict) else result
        result.cached = state.name == "Cached"
    else:
        result = result_type(status="error", reason=failure(state, settings))
    result.seconds, result.started_at = seconds, started_at
    announce(group, step, "end", result.status, seconds, result.reason)
    return result


def failure(state, settings) -> str:
    """Why a task's run did not complete, in a sentence; a timeout names the setting that raises it."""
    error = state.result(raise_on_failure=False)
    if state.name == "TimedOut" or isinstance(error, TimeoutError):
        limit = f"steps.{settings.key}.timeout_s"
        return (f"timed out after {settings.timeout_s:g} s, the limit {limit}; raise it in the config or with "
                f"--set {limit}={settings.timeout_s * 2:g}")
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return f"{state.name}: {state.message}"
