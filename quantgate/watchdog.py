"""A watchdog that outlives a `quantgate run` killed without warning (SIGKILL, the out-of-memory killer): it
remembers the run's descendants (the temporary Prefect server, a benchmark's process) while the run lives, and
when it dies kills them and settles its record (quantgate.settle).

`python -m quantgate.watchdog PID RUNS_DIR HISTORY_DB REGISTRY_DIR`, started by the command line."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

POLL_S = 0.5


def start(runs_dir: Path, history_db: Path | str, registry_dir: Path) -> subprocess.Popen:
    """Watch this process; the watchdog runs in a session of its own, so a signal to the run's group spares it."""
    return subprocess.Popen([sys.executable, "-m", "quantgate.watchdog", str(os.getpid()), str(runs_dir),
                             str(history_db), str(registry_dir)], start_new_session=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def descendants(parent: psutil.Process) -> dict[int, float]:
    """The process's descendants by pid, with their start times (a pid reused later is not theirs)."""
    found = {}
    for child in parent.children(recursive=True):
        try:
            found[child.pid] = child.create_time()
        except psutil.NoSuchProcess:
            continue
    found.pop(os.getpid(), None)
    return found


def kill(known: dict[int, float]) -> None:
    for pid, started in known.items():
        try:
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.01:
                process.kill()
        except psutil.NoSuchProcess:
            continue


def watch(pid: int, runs_dir: Path, history_db: Path | str, registry_dir: Path) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    known: dict[int, float] = {}
    while True:
        try:
            if parent.status() == psutil.STATUS_ZOMBIE:
                break
            known.update(descendants(parent))
        except psutil.NoSuchProcess:
            break
        time.sleep(POLL_S)
    kill(known)
    from quantgate.settle import settle  # only now: the watchdog stays small while the run lives

    settle(runs_dir, history_db, registry_dir)


if __name__ == "__main__":
    from quantgate.paths import history_location

    watch(int(sys.argv[1]), Path(sys.argv[2]), history_location(sys.argv[3]), Path(sys.argv[4]))
