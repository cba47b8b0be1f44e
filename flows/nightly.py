"""The nightly flow: every cell of the matrix (model x recipe) as its own quantize-model run, through
the `quantize` deployment so that every worker of its work pool takes a share; then each cell
against the last passing run of the same model and recipe. A regression fails this flow run."""
from __future__ import annotations

import secrets
import time
from datetime import datetime, timezone
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.events import emit_event

from flows.quantize_model import quantize_model
from quantgate import dashboard, gate, history
from quantgate.config import load_nightly
from quantgate.paths import PROJECT_ROOT


class RegressionError(RuntimeError):
    pass


def queue(gpus: int) -> str:
    """The work queue of a cell that needs this many GPUs of one host."""
    return "default" if gpus == 1 else f"gpus-{gpus}"


def cell_runs(matrix, nightly_id: str) -> list[dict]:
    """Start every cell, wait for all; returns what happened to each flow run."""
    cells = [(model, recipe) for model in matrix.models for recipe in matrix.recipes]
    params = [{"config_path": str(model.config), "nightly_id": nightly_id,
               "overrides": [*model.overrides, f"recipes=[{recipe}]", f"output.history_db={matrix.history_db}"]}
              for model, recipe in cells]
    if matrix.deployment is None:
        return [{"cell": f"{m.config}:{r}", "state": quantize_model(**p, return_state=True).name}
                for (m, r), p in zip(cells, params)]
    from prefect import get_client
    from prefect.deployments import run_deployment

    started = [run_deployment(matrix.deployment, parameters=p, timeout=0, as_subflow=True, tags=["quantgate-nightly"],
                              work_queue_name=queue(m.gpus)) for (m, _), p in zip(cells, params)]
    log = get_run_logger()
    with get_client(sync_client=True) as client:
        pending = {run.id for run in started}
        while pending:
            time.sleep(5)
            for run_id in list(pending):
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    pending.discard(run_id)
                    log.info("cell %s: %s (%d left)", run.name, run.state.name, len(pending))
        finished = [client.read_flow_run(run.id) for run in started]
    return [{"cell": f"{m.config}:{r}", "flow_run": run.name, "state": run.state.name}
            for (m, r), run in zip(cells, finished)]


def emit_alerts(nightly_id: str, results: list[dict], missing: list[dict]) -> None:
    """An event per regressed cell and per cell that did not finish or errored, for the automations of
    configs/automations (`quantgate alerts`) to notify on."""
    def emit(event: str, key: str, cell: str, **payload) -> None:
        emit_event(event, resource={"prefect.resource.id": f"quantgate.cell.{key}", "prefect.resource.name": cell},
                   payload={"nightly_id": nightly_id, "cell": cell, **payload})

    for c in results:
        key, cell = f"{c['model']}.{c['recipe']}", f"{c['model']} {c['recipe']}"
        if c["gate"] == "regressed":
            emit("quantgate.nightly.regression", key, cell, run_id=c["run_id"], model=c["model"], recipe=c["recipe"],
                 regressions=c["regressions"], env_changes=c["env_changes"])
        elif c["status"] == "error":  # a step errored: the cell measured nothing
            emit("quantgate.nightly.cell-failed", key, cell, state="error", run_id=c["run_id"], reason=c.get("reason"))
    for r in missing:
        emit("quantgate.nightly.cell-failed", r["cell"], r["cell"], state=r["state"], flow_run=r.get("flow_run"))


@flow(name="nightly")
def nightly(matrix: str = str(PROJECT_ROOT / "configs" / "nightly.yaml")) -> str:
    config = load_nightly(matrix)
    nightly_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    runs = cell_runs(config, nightly_id)
    recorded = history.nightly_runs(config.history_db, nightly_id)
    results = [cell for run_id in recorded for cell in gate.gate_run(config.history_db, run_id, config.gate)]
    history.set_gate(config.history_db, results)  # the dashboard shows what the gate decided
    dashboard.write(config.history_db, config.dashboard)
    # Failed is a run that finished with a failing verdict (its record is gated); anything else left no record.
    missing = [r for r in runs if r["state"] not in ("Completed", "Failed")]
    summary = gate.summary(nightly_id, runs, results, missing, Path(config.dashboard).resolve())
    create_markdown_artifact(markdown=summary, key="quantgate-nightly", description=nightly_id)
    get_run_logger().info("%s", summary)
    emit_alerts(nightly_id, results, missing)
    if failures := gate.failures(results, missing):
        raise RegressionError("; ".join(failures))
    return nightly_id
