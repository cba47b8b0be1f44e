"""Approval before the Hub (`steps.publish.approve`): the flow run pauses with a form showing the recipe's verdict,
figures and card; a reviewer approves or rejects it in Prefect's UI or with `quantgate approve`; no answer within
the timeout rejects. The local registry is not asked for."""
from __future__ import annotations

import contextvars
import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.flow_runs import pause_flow_run, resume_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from flows.artifacts import artifact_key
from quantgate.card import render_card
from quantgate.report import summary_header, summary_rows, table
from quantgate.runlog import SHOWN
from tasks.publish import hub_repo_id

log = logging.getLogger("quantgate.publish")


class Approval(RunInput):
    approve: bool = False
    reviewer: str = ""
    reason: str = ""


def pause_key(run_id: str, recipe: str) -> str:
    """The pause's key, which `quantgate approve RUN_ID RECIPE` finds it by (Prefect's keys: [a-z0-9-])."""
    return artifact_key("approve", run_id, recipe, hashlib.sha256(recipe.encode()).hexdigest()[:6])


def describe(run_dir: Path, metrics: dict, recipe: str, repo_id: str) -> str:
    """What the reviewer decides on: the recipe's row of the run's summary beside the reference's, as report.md shows
    them, and its card."""
    rows = [row for row in summary_rows(metrics) if row[0] in ("reference", recipe)]
    return "\n".join([f"## Publish {recipe} of run {metrics['run_id']} to the Hub as `{repo_id}`?", "",
                      *table(summary_header(), rows), "", "---", "", render_card(run_dir, recipe, repo_id)])


def ask(run_dir: Path, recipe: str, repo_template: str, timeout_s: int) -> tuple[bool, str]:
    """Pause this flow run until a reviewer answers: whether to publish, and who decided what, in a sentence."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    repo_id = hub_repo_id(repo_template, metrics, recipe)
    form = Approval.with_initial_data(description=describe(run_dir, metrics, recipe, repo_id))
    log.info("%s: waiting up to %d s for a reviewer to approve the upload to %s (Prefect's UI, or `quantgate approve "
             "%s %s`)", recipe, timeout_s, repo_id, metrics["run_id"], recipe, extra=SHOWN)
    silence = f"not approved within {timeout_s} s (steps.publish.approve_timeout_s)"
    # Prefect fails a flow run whose pause expires; the run answers itself instead, a rejection, and goes on.
    timer = threading.Timer(timeout_s, contextvars.copy_context().run,
                            (reject_if_paused, flow_run.get_id(), {"reviewer": "quantgate", "reason": silence}))
    timer.start()
    try:
        answer = pause_flow_run(wait_for_input=form, timeout=timeout_s + 600, poll_interval=2,
                                key=pause_key(metrics["run_id"], recipe))
    except FlowPauseTimeout:
        return False, silence
    finally:
        timer.cancel()
    if answer.reviewer == "quantgate" and answer.reason == silence:
        return False, silence
    who = answer.reviewer or "a reviewer"
    if answer.approve:
        return True, f"approved by {who}" + (f": {answer.reason}" if answer.reason else "")
    return False, f"rejected by {who}: {answer.reason or 'no reason given'}"


def reject_if_paused(flow_run_id, answer: dict) -> None:
    for _ in range(30):
        try:
            return resume_flow_run(flow_run_id, run_input={"approve": False, **answer})
        except (NotPausedError, FlowPauseTimeout):  # a reviewer answered first, or the pause is over anyway
            return None
        except Exception:  # refused for a moment (the form's schema not saved yet, the server busy): asked again
            time.sleep(1)
    log.warning("could not answer the pause of flow run %s after its timeout: %s", flow_run_id, answer["reason"])


def waiting() -> dict[str, str]:
    """The flow runs paused for an approval: pause key to flow run id."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Paused"]))))
    return {key: str(run.id) for run in runs if (key := run.state.state_details.pause_key or "").startswith("approve-")}


def answer(run_id: str, recipe: str, approve: bool, reviewer: str, reason: str) -> str:
    """Resume the flow run paused for this run's recipe with a reviewer's answer (what the UI's form sends); its
    flow run id."""
    flow_run = waiting().get(pause_key(run_id, recipe))
    if flow_run is None:
        raise LookupError(f"no flow run is waiting for an approval of {recipe} in run {run_id}")
    try:
        resume_flow_run(flow_run, run_input={"approve": approve, "reviewer": reviewer, "reason": reason})
    except (NotPausedError, FlowPauseTimeout):
        raise LookupError(f"flow run {flow_run} is no longer waiting (answered, or its time ran out)") from None
    except RuntimeError as e:  # Prefect refused the answer: the form's schema not saved yet, a field it does not take
        raise LookupError(f"Prefect refused the answer: {e}") from None
    return flow_run
