"""What a killed run leaves, settled by whoever comes next (the watchdog that outlived it, the next run, `quantgate
history`): a record still `running` whose process is gone reads `interrupted` (killed) and joins the history, its
half-written files go, and registry staging folders of dead publishers are removed."""
from __future__ import annotations

import json
import logging
import re
import shutil
import socket
from datetime import datetime
from pathlib import Path

import psutil

from quantgate import history
from quantgate.record import stop

log = logging.getLogger("quantgate.settle")
STAGING = re.compile(r"^\.staging-(\d+)-")  # tasks/publish.py's staging folders carry their publisher's pid


def alive(pid: int, since: str | None = None) -> bool:
    """Whether process `pid` runs and (given the time its run started) is the same process, not a reused pid."""
    try:
        process = psutil.Process(pid)
        return since is None or process.create_time() <= datetime.fromisoformat(since).timestamp() + 1
    except (psutil.NoSuchProcess, ValueError):
        return False


def dead_runs(runs_dir: Path, recorded: set[str] = frozenset()) -> list[tuple[Path, dict]]:
    """Run folders whose record reads `running` though the process that wrote it (on this host) is gone. A run the
    history holds finished (or was settled), so only the others' records are read."""
    found = []
    for path in sorted(Path(runs_dir).glob("*/metrics.json")) if Path(runs_dir).is_dir() else []:
        if path.parent.name in recorded:
            continue
        try:
            metrics = json.loads(path.read_text())
        except ValueError:
            continue
        if metrics.get("status") == "running" and metrics.get("host") == socket.gethostname() \
                and isinstance(metrics.get("pid"), int) and not alive(metrics["pid"], metrics.get("started_at")):
            found.append((path.parent, metrics))
    return found


def settle(runs_dir: Path, history_db: Path | None = None, registry_dir: Path | None = None) -> list[str]:
    """Settle every dead run under runs_dir (and record it in history_db), and clear dead publishers' staging
    folders under registry_dir; the run ids settled."""
    settled = []
    try:
        recorded = history.run_ids(history_db) if history_db is not None and history.exists(history_db) else set()
    except history.HistoryError as e:  # a database server down: the run folders still say what happened
        log.warning("%s; the killed runs below are settled in their folders only", e)
        recorded, history_db = set(), None
    for run_dir, metrics in dead_runs(runs_dir, recorded):
        why = f"killed: its process ({metrics['pid']}) ended without finishing (SIGKILL, or the out-of-memory killer)"
        stop(run_dir, metrics, why, f"the run was killed ({metrics['pid']})")
        if history_db is not None:
            history.record_run(history_db, run_dir)
        log.warning("run %s: %s", metrics["run_id"], why)
        settled.append(metrics["run_id"])
    for staging in Path(registry_dir).glob("*/*/.staging-*") if registry_dir and Path(registry_dir).is_dir() else []:
        if (match := STAGING.match(staging.name)) and not alive(int(match.group(1))):
            shutil.rmtree(staging, ignore_errors=True)
            log.warning("removed %s, left by a publisher that died", staging)
    return settled
