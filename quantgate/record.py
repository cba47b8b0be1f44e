"""The run record (../shared/contract/run-record.md): runs/<run_id>/ with config.yaml, env.json,
metrics.json (always written atomically), report.md and <recipe>/plan.json."""
from __future__ import annotations

import copy
import functools
import os
import secrets
import socket
import shutil
import threading
from datetime import datetime, timezone
from pathlib import Path

from quantgate.config import RunConfig, dump_config
from quantgate.environment import environment
from quantgate.files import under, write_json
from quantgate.report import NOT_GATED, STEPS, write_report
from quantgate.results import Downloaded, Reference, StepResult

SCHEMA = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def locked(method):
    """One thread at a time in the record: recipes gated side by side (model.recipes_at_once) write it from threads."""
    @functools.wraps(method)
    def one_at_a_time(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return one_at_a_time


class RunRecord:
    def __init__(self, config: RunConfig, config_path: str, nightly_id: str | None = None):
        self.lock = threading.RLock()
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self.dir = Path(config.output.runs_dir).resolve() / self.run_id
        self.dir.mkdir(parents=True)
        (self.dir / "config.yaml").write_text(f"# resolved from {config_path}\n" + dump_config(config))
        write_json(self.dir / "env.json", environment())
        self.metrics = {"schema": SCHEMA, "run_id": self.run_id, "status": "running", "started_at": now(),
                        "pid": os.getpid(), "host": socket.gethostname(),
                        "finished_at": None, "config_path": str(config_path), "nightly_id": nightly_id,
                        "model": {"source": config.model.source, "revision": config.model.revision},
                        "reference": {}, "recipes": {}}
        for recipe in config.recipes:
            self.metrics["recipes"][recipe.name] = {
                "status": "pending", "steps": {s: {"status": "not_run"} for s in STEPS}}
        self.save()

    @locked
    def save(self) -> None:
        write_json(self.dir / "metrics.json", self.metrics)

    def recipe_dir(self, name: str) -> Path:
        return under(self.dir, name)

    @locked
    def set_model(self, download: Downloaded) -> None:
        model = self.metrics["model"]
        model["download"] = download.view()
        if download.ok:
            model.update({k: getattr(download, k) for k in ("revision", "checkpoint_sha256", "checkpoint",
                                                             "base_model", "license")})
        else:
            self._settle_recipes("error", f"download: {download.reason}")
        self.save()

    @locked
    def set_reference(self, result: Reference) -> None:
        self.metrics["reference"] = result.record()
        if not result.ok:  # nothing to compare a recipe with: none runs, none reads passed
            self._settle_recipes("error", f"reference: {result.reason or ''}")
        self.save()

    @locked
    def set_base_broken(self, reason: str) -> None:
        """The unquantized model itself goes non-finite: no recipe's verdict could mean anything, so none runs."""
        self.metrics["base_broken"] = reason
        self._settle_recipes("skipped", f"{NOT_GATED}{reason}")
        self.save()

    def _settle_recipes(self, status: str, reason: str) -> None:
        """Every recipe not yet settled ends here for a reason of the model's: before any of its steps, or, side by
        side, after a quantize that ran beside the reference (a recipe's own failure keeps its reason)."""
        for entry in self.metrics["recipes"].values():
            if entry["status"] == "pending":
                entry.update(status=status, reason=reason)

    @locked
    def set_reference_benchmark(self, result: StepResult) -> None:
        self.metrics["reference"]["benchmark"] = result.record()
        self.save()

    @locked
    def set_step(self, recipe: str, step: str, result: StepResult) -> bool:
        """Record one step of a recipe; a step that did not end ok settles the recipe's status.
        Whether the step ended ok (and the recipe goes on)."""
        entry = self.metrics["recipes"][recipe]
        entry["steps"][step] = result.view()
        if measured := result.figures():
            entry[step] = measured
        entry.setdefault("warnings", []).extend(f"{step}: {w}" for w in result.warnings)
        settle_recipe(entry, step, result)
        self.save()
        return result.ok

    @locked
    def set_adapters(self, recipe: str, result: StepResult) -> bool:
        """A recipe's served adapters under `adapters.<name>`; one whose effect the recipe loses fails the recipe (the
        model it serves is base and adapter). Whether the recipe goes on."""
        entry = self.metrics["recipes"][recipe]
        entry["steps"]["adapters"], entry["adapters"] = result.view(), result.figures().get("adapters", {})
        entry.setdefault("warnings", []).extend(f"adapters: {w}" for w in result.warnings)
        settle_recipe(entry, "adapters", result)
        self.save()
        return result.ok

    @locked
    def set_generated(self, recipe: str, result: StepResult) -> None:
        """A recipe's own generations made while the reference was measured, in its `steps`; one that did not end ok
        leaves the recipe's status (validate makes them itself)."""
        self.metrics["recipes"][recipe]["steps"]["generate"] = result.view()
        self.save()

    @locked
    def set_remedy(self, recipe: str, result: StepResult) -> None:
        """A recipe's remedy (its status stays the verdict's); the attribution goes under its validate entry."""
        entry, record = self.metrics["recipes"][recipe], result.record()
        if found := record.pop("attribution", None):
            entry.setdefault("validate", {})["attribution"] = found
        entry["remedy"] = record
        self.save()

    @locked
    def snapshot(self) -> dict:
        """A copy of the record as it stands, for a step to read while other recipes write theirs."""
        return copy.deepcopy(self.metrics)

    @locked
    def interrupt(self, why: str) -> None:
        """A stopped run (SIGINT, SIGTERM): the record says so and where each recipe had got to."""
        stop(self.dir, self.metrics, f"stopped by {why}", f"the run was stopped ({why})")

    def model_errored(self) -> bool:
        """Whether one of the model's own steps (download, reference, the reference's benchmark) errored."""
        ref = self.metrics["reference"]
        steps = [self.metrics["model"].get("download"), ref or None, ref.get("benchmark") if ref else None]
        return any(s is not None and s["status"] not in ("ok", "skipped", "not_run") for s in steps)

    @locked
    def finish(self) -> dict:
        for entry in self.metrics["recipes"].values():
            if entry["status"] == "pending":
                entry["status"] = "passed"
            for step in STEPS:
                state = entry["steps"][step]
                if state["status"] == "not_run" and "reason" not in state:
                    state["reason"] = f"the recipe stopped: {entry.get('reason', '')}"
        statuses = {e["status"] for e in self.metrics["recipes"].values()}
        statuses |= {"error"} if self.model_errored() else set()
        statuses |= {"failed"} if self.metrics.get("base_broken") else set()
        self.metrics["status"] = "error" if "error" in statuses else "failed" if "failed" in statuses else "passed"
        self.metrics["finished_at"] = now()
        self.save()
        write_report(self.dir, self.metrics)
        return self.metrics


def settle_recipe(entry: dict, step: str, result: StepResult) -> None:
    """A step that did not end ok settles its recipe's status and reason; one the config turned off (not_run) says
    so in its own entry and leaves the recipe's status."""
    if result.status not in ("ok", "not_run"):
        entry["status"] = {"failed": "failed", "skipped": "skipped"}.get(result.status, "error")
        entry["reason"] = f"{step}: {result.reason or ''}"


def stop(run_dir: Path, metrics: dict, reason: str, why: str) -> None:
    """A run that will not finish: the record says so and where each recipe had got to; half-written files
    (*.tmp) go, so nothing in the run folder reads as finished that is not."""
    for path in sorted(run_dir.rglob("*.tmp"), reverse=True):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for entry in metrics["recipes"].values():
        if entry["status"] == "pending":
            reached = next((s for s in STEPS if entry["steps"][s]["status"] == "not_run"), STEPS[-1])
            entry.update(status="interrupted", reason=f"{why} before {reached} finished")
    metrics.update(status="interrupted", reason=reason, finished_at=now())
    write_json(run_dir / "metrics.json", metrics)
    write_report(run_dir, metrics)
