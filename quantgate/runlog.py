"""A run's log file and its progress lines.

Everything the libraries say while a run works (their log records, Python warnings, progress
bars written to stdout or stderr) goes to `runs/<run_id>/run.log`; quantgate's own records go
there too and to Prefect's UI. The steps' starts and ends are records of the `quantgate.progress`
logger, carrying `group` (a recipe, or `model`), `step`, `event` and, at the end, `status` and
`seconds`: the command line draws them as one bar per recipe.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

progress = logging.getLogger("quantgate.progress")
SHOWN = {"terminal": True}  # `extra=` of an INFO record the terminal shows too (a step's milestone); all go to the log
# Loggers whose INFO records belong in the run's log (their default level would drop them).
INFO_LOGGERS = ("quantgate", "lm_eval", "output")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def announce(group: str, step: str, event: str, status: str | None = None, seconds: float | None = None,
             reason: str | None = None) -> None:
    """One progress record: a step of a recipe (or of the model) started or ended."""
    extra = {"group": group, "step": step, "event": event, "status": status, "seconds": seconds, "reason": reason}
    if event == "start":
        progress.info("%s: %s started", group, step, extra=extra)
    else:
        progress.info("%s: %s %s (%.1f s)%s", group, step, status, seconds or 0, f": {reason}" if reason else "",
                      extra=extra)


@contextmanager
def to_file(path: Path, ui: logging.Handler | None = None):
    """Send every log record of this process, Python warnings included, to `path` while the block runs; and
    quantgate's own records to `ui` (the orchestrator's log handler, which shows them in its UI), if given."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT, "%H:%M:%S"))
    handler.setLevel(logging.INFO)
    root = logging.getLogger()
    root.addHandler(handler)
    restore = libraries_to_root()
    # Set on the logger here rather than through the orchestrator's settings, which a worker may not have set.
    quantgate = logging.getLogger("quantgate")
    api = ui if ui is not None and not any(type(h) is type(ui) for h in quantgate.handlers) else None
    if api:
        api.setLevel(logging.INFO)
        quantgate.addHandler(api)
    progress.info("run %s; what the libraries print goes to %s", path.parent.name, path, extra={"event": "run"})
    try:
        yield path
    finally:
        if api:
            quantgate.removeHandler(api)
        restore()
        root.removeHandler(handler)
        handler.close()


def libraries_to_root():
    """The libraries' records at the levels a run's log keeps, through the root logger: INFO for INFO_LOGGERS,
    transformers' own (which it writes to stderr and does not propagate) and Python warnings. Returns what undoes it."""
    from transformers.utils import logging as hf_logging

    levels = {name: logging.getLogger(name).level for name in INFO_LOGGERS}
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    logging.captureWarnings(True)

    def restore() -> None:
        logging.captureWarnings(False)
        hf_logging.disable_propagation()
        hf_logging.enable_default_handler()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    return restore


def pause(seconds: float) -> None:
    """time.sleep in quarter seconds, raising where the run was told to stop meanwhile (raise_if_signalled)."""
    for _ in range(max(round(seconds / 0.25), 1)):
        raise_if_signalled()
        time.sleep(0.25)


class Stopped(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so that every `finally` and atexit handler runs."""


_signalled: str | None = None  # the signal received inside stop_on_signals' block, until the block ends
# Set while a run's recipes gated side by side stop (flows.workers): their threads, waiting for a turn, a device's slot
# or a worker, give way at their next check, as a signal only the main thread receives cannot make them.
stop_requested = threading.Event()


@contextmanager
def stop_on_signals():
    """While the block runs in the main thread, SIGTERM raises Stopped (SIGINT raises KeyboardInterrupt); where
    that raise is lost, raise_if_signalled raises it again."""
    global _signalled
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        global _signalled
        _signalled = signal.Signals(signum).name
        raise Stopped(_signalled)

    previous, outer = signal.signal(signal.SIGTERM, stop), _signalled
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _signalled = outer


def raise_if_signalled() -> None:
    """Stopped, where SIGTERM came but its Stopped never reached the run: Python prints and drops an exception
    raised in a finalizer (`__del__`), so a signal landing while one runs is lost (the suite's SIGTERM test saw it
    once, in asyncio's transport finalizer). SIGINT's KeyboardInterrupt is Python's own, and not remembered."""
    if _signalled:
        raise Stopped(_signalled)
    if stop_requested.is_set():
        raise Stopped("the run is stopping")


def stop_children(timeout_s: float = 10, spare=lambda process: False, parent=None) -> int:
    """Terminate the children of `parent` (this process by default: a benchmark's own process, a sandbox), killing
    what is left after timeout_s; returns how many there were. `spare`: children left to their owner's shutdown."""
    import psutil

    parent = parent or psutil.Process()
    children = [c for c in parent.children(recursive=True) if not _spared(c, spare)]
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for child in alive:
        child.kill()
    return len(children)


def _spared(process, spare) -> bool:
    try:
        return bool(spare(process))
    except Exception:  # noqa: BLE001 - a child gone meanwhile, or one whose command line cannot be read
        return False
