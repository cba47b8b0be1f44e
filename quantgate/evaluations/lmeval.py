"""Running the registered evaluations through lm-eval on a model already loaded (lm-eval's HFLM wraps it), and
the reference's results, cached across runs by checkpoint hash, data, task files and settings."""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

from quantgate import evaluations, modeling
from quantgate.files import write_json
from quantgate.paths import DATA_DIR

log = logging.getLogger("quantgate.evaluate")
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


@functools.cache
def task_manager(with_lm_evals_own: bool = False):
    """lm-eval's index of our task folder, once a process; lm-eval's own thousands of task files are indexed only
    for the Hub's mmlu (5 s a model on a 2-core CPU)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=with_lm_evals_own)


@functools.cache
def without_env_report() -> None:
    """lm-eval's results carry torch's collect_env, a `pip list` (and nvidia-smi) on every simple_evaluate, about
    0.3 s each and three a model; quantgate keeps none of it, since the run's env.json records the environment once."""
    from lm_eval import evaluator

    evaluator.add_env_info = lambda storage: None


def hf_lm(model, tokenizer, settings):
    """lm-eval's wrapper of the loaded model. `auto` probes batch sizes with full-length forwards: minutes on a
    CPU, so 8 there."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    batch_size = 8 if str(settings.batch_size).startswith("auto") and device == "cpu" else settings.batch_size
    own = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or settings.max_length
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                max_length=min(settings.max_length, own))


def run_all(model, tokenizer, settings, floors: bool = False) -> dict:
    """Every enabled evaluation's results, per item included; with `floors` (the reference), each one's own spread
    where it measures one."""
    without_env_report()
    lm = hf_lm(model, tokenizer, settings)
    manager = task_manager(with_lm_evals_own=settings.mmlu_source == "hub")
    results = {e.name: e.run(lm, tokenizer, settings, manager) for e in evaluations.enabled(settings)}
    for e in evaluations.enabled(settings) if floors else ():
        if (found := e.floor(lm, tokenizer, settings, manager, results[e.name])) is not None:
            results[e.name]["floor"] = found
    return results


def summary(results: dict) -> dict:
    """The record's view: everything but the per-item scores, which stay in the results file."""
    return {name: {k: v for k, v in r.items() if k != getattr(evaluations.EVALUATIONS.get(name), "paired", None)}
            for name, r in results.items()}


def compared(results: dict, reference: dict, settings) -> dict:
    """A recipe's record view, each evaluation compared with the reference's where the reference has it."""
    out = summary(results)
    for name, mine in results.items():
        if name in reference and name in evaluations.EVALUATIONS:
            out[name].update(evaluations.EVALUATIONS[name].compare(mine, reference[name], settings))
    return out


def eval_key(checkpoint_sha256: str, dtype: str, settings) -> str:
    """The reference's cache key: the checkpoint, the data and task files it read, and the settings."""
    digest = hashlib.sha256()
    for path in [DATA_DIR / "mmlu" / "test.jsonl", DATA_DIR / "humaneval" / "HumanEval.jsonl.gz",
                 *sorted(TASKS_DIR.glob("*"))]:
        if path.is_file():
            digest.update(path.read_bytes())
    # "floors": results cached before the reference measured its own spread are measured again, not reused without it
    spec = json.dumps([checkpoint_sha256, dtype, digest.hexdigest(), sorted(evaluations.EVALUATIONS),
                       settings.model_dump(exclude={"timeout_s", "retries", "adapters"}), "floors"])
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def cached_results(path: Path) -> dict | None:
    """A cached reference evaluation, or None (with a warning: it is measured again) where it is not one."""
    try:
        results = json.loads(path.read_text())
        paired = {e.name: e.paired for e in evaluations.registered() if e.paired}
        if isinstance(results, dict) and results and all(
                isinstance(results[name].get(field), dict) for name, field in paired.items() if name in results):
            return results
        problem = "no per-question results"
    except ValueError as e:
        problem = f"not JSON: {e}"
    log.warning("cached reference evaluation %s is unusable (%s): measuring it again", path, problem)
    return None


def reference_evaluation(model, tokenizer, checkpoint_sha256: str, dtype: str, cache_dir: Path, settings) -> dict:
    """The reference's evaluation, from the cache when the same checkpoint and settings ran before."""
    path = Path(cache_dir) / "reference" / eval_key(checkpoint_sha256, dtype, settings) / "evaluate.json"
    results = cached_results(path) if path.is_file() else None
    cached = results is not None
    if not cached:
        with modeling.timed("evaluate reference"):
            results = run_all(model, tokenizer, settings, floors=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
    return {"path": str(path), "cached": cached, **summary(results)}
