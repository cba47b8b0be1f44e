"""Running a measurement in processes of its own (quantgate.bench.worker) under the step's timeout: its result, or a
record of how the process died; several processes, the one with the median decode figure and their spread."""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import functools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from quantgate.bench.worker import Spec, limits_of
from quantgate.bench.standby import Standby
from quantgate.bench.zygote import Zygote, ZygoteError, imported_with
from quantgate.files import write_json
from quantgate.runlog import raise_if_signalled

log = logging.getLogger("quantgate.benchmark")


def measured_in_processes(name: str, spec: Spec, out: Path, processes: int, alone=None) -> dict:
    """The measurement in `processes` processes of its own: the one with the median decode figure, with every
    process's figure and their spread, (max - min) / median, in its latency (one process: its repeats' spread).
    Several are fresh interpreters, never forked: siblings forked from one zygote share its address layout and
    hash seed, which fresh processes do not, and the spread is meant to show what a fresh process varies by."""
    if processes == 1:
        return run_measurement(name, spec, out / "benchmark.json", alone=alone)
    results = [run_measurement(name, spec, out / f"benchmark-process{i}.json", fresh=True, alone=alone)
               for i in range(1, processes + 1)]
    if failed := next((r for r in results if r["status"] != "ok"), None):
        return failed
    results.sort(key=lambda r: r["latency"]["decode_ms_per_token"])
    chosen = results[(len(results) - 1) // 2]
    figures = [r["latency"]["decode_ms_per_token"] for r in results]
    chosen["latency"].update(decode_ms_by_process=figures,
                             decode_spread=round((max(figures) - min(figures)) / chosen["latency"]["decode_ms_per_token"], 4),
                             decode_spread_over="processes")
    write_json(out / "benchmark.json", {k: v for k, v in chosen.items() if k != "status"})
    return chosen


def measurement_env(spec: Spec | None = None) -> dict:
    # The worker runs in the measurement's folder (below); quantgate is imported from where this file is.
    project = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)}
    if spec and spec.inductor_cache:
        # set over any inherited value: inductor writes its /tmp default into the environment once used
        env["TORCHINDUCTOR_CACHE_DIR"] = spec.inductor_cache
    return env


def run_measurement(name: str, spec: Spec, result_path: Path, fresh: bool = False, alone=None,
                    cancel: threading.Event | None = None) -> dict:
    """quantgate.bench.worker on SPEC in a process of its own (a fresh interpreter where `fresh`) under the step's
    timeout; its result, or a record of its error. What it printed goes to `<result>-log.txt` beside the result,
    its `benchmark:` lines to the step's log. With `alone` (a context manager factory: the device to this process
    alone), the process loads and compiles first, then measures inside `alone()`; its wait for it is not timed out."""
    out, result_path = Path(spec.out_dir).resolve(), result_path.resolve()
    turn = tuple(result_path.with_name(f"{result_path.stem}-{what}") for what in ("ready", "go")) if alone else None
    spec = spec.model_copy(update={"out_dir": str(out), "turn": turn and tuple(map(str, turn))})
    settings, spec_path = spec.settings, result_path.with_name(result_path.stem + "-spec.json")
    log_path = result_path.with_name(result_path.stem + "-log.txt")
    write_json(spec_path, spec.model_dump(mode="json"))
    for stale in (result_path, *(turn or ())):
        stale.unlink(missing_ok=True)
    log_path.write_text("")
    tail: deque[str] = deque(maxlen=40)

    def shown(line: str) -> None:
        tail.append(line)
        if line.startswith("benchmark"):
            log.info("%s: %s", name, line)

    # In the measurement's folder: what a library writes to a relative path stays in the run (peft 0.21 copies an
    # offloaded checkpoint's weights to its absolute path made relative when it loads an adapter onto them).
    proc, started, lease = start_process([str(spec_path), str(result_path)], log_path, out, measurement_env(spec),
                                         fresh)
    log.info("%s: benchmark: %s process %d started", name, started, proc.pid)
    ended = threading.Event()
    # In this thread's context: its lines reach an orchestrator's handler as the step's own (Prefect's UI, not a
    # warning that a log came from outside any run).
    reader = threading.Thread(target=contextvars.copy_context().run, args=(follow, log_path, ended, shown), daemon=True)
    reader.start()
    held, code, quiet = Alone(alone), None, contextlib.ExitStack()
    if alone is None and spec.latency:  # no turn says when it times: the whole of its life
        quiet.enter_context(timing())
    try:
        code = waited(proc, settings.timeout_s, turn, held.take, cancel)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"the benchmark process ran past {settings.timeout_s:g} s",
                "process": started, **held.span}
    finally:
        if code is None:  # a timeout, a stop, the step's own timeout raised in this thread
            proc.kill()
            proc.wait()
        release(lease)
        quiet.close()
        ended.set()
        reader.join(timeout=5)
        shutil.rmtree(spec.offload_folder, ignore_errors=True)
        held.close(*sys.exc_info())  # last: giving the device back may wait, or raise with the run stopping
    limits = limits_of(settings)
    if code != 0 or not result_path.is_file():
        error = next((line for line in reversed(tail) if re.match(r"^[\w.]+(Error|Exception)\b", line)), None) \
            or (tail[-1] if tail else "no output")
        why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
        return {"status": "error", "reason": f"the benchmark process failed ({why}): {error}"
                + (f"; under the limits {limits}" if limits else ""), "limits": limits, "log_tail": list(tail)[-15:],
                "process": started, **held.span}
    return {"status": "ok", **json.loads(result_path.read_text()), "process": started, **held.span}


class Cancelled(RuntimeError):
    """A measurement beside a step that ended first: its process is killed."""


class Beside:
    """A measurement that times nothing (run_measurement's arguments), in a thread of its own beside the others where
    `beside`, and then asked for by `before(alone)`, a turn that waits for it to end first; else run by `result()`,
    after them."""

    def __init__(self, name: str, spec: Spec, result_path: Path, beside: bool):
        self.cancel = threading.Event()
        self.measure = functools.partial(run_measurement, name, spec, result_path, cancel=self.cancel)
        self.name, self.beside, self.found, self.thread = name, beside, None, None

    def __enter__(self):
        if self.beside:  # in this context, so that its log lines stay the step's
            self.thread = threading.Thread(target=contextvars.copy_context().run, args=(self.run,), daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.join(cancel=bool(exc) and exc[0] is not None)  # the step stops: its process killed, not waited for

    def join(self, cancel: bool = False) -> None:
        if self.thread:
            if cancel:
                self.cancel.set()
            self.thread.join()

    def run(self) -> None:
        try:
            self.found = self.measure()
        except BaseException as e:  # noqa: BLE001 - a stop reaches the step's own thread too; here, a record of why
            self.found = {"status": "error", "reason": f"{type(e).__name__}: {e}"}

    def before(self, alone):
        """`alone`, asked for once this measurement has ended: its wait for it is not the turn's."""
        if not self.beside:
            return alone

        def after_it():
            t0 = time.monotonic()
            self.join()
            if (seconds := time.monotonic() - t0) >= 0.1:
                log.info("%s: benchmark: the measurement beside it waited %.1f s for it to end before asking for "
                         "the device alone", self.name, seconds)
            return alone()
        return after_it

    def result(self) -> dict:
        if self.found is None and not self.beside:
            self.run()
        return self.found or {"status": "error", "reason": "the measurement's thread ended without a result"}


class Alone:
    """A measurement's time with the device to itself (`alone()`, an orchestrator's turn): taken once it is ready,
    given back when it ends (told of an exception in flight, so a step that stops does not wait to go on), and its
    span for the record (`alone`: when, how long, how long it waited)."""

    def __init__(self, alone):
        self.alone, self.held, self.span, self.since = alone, None, {}, None
        self.quiet = contextlib.ExitStack()

    def take(self) -> None:
        held = self.alone()  # a turn that first waits for a measurement beside (Beside.before) waits here
        t0 = time.monotonic()
        held.__enter__()
        self.quiet.enter_context(timing())
        self.held, self.since = held, time.monotonic()
        self.span = {"alone": {"started_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                               "waited_s": round(self.since - t0, 2)}}

    def close(self, *exc) -> None:
        if self.held is None:
            return
        self.span["alone"]["seconds"] = round(time.monotonic() - self.since, 2)  # before giving it back, which may wait
        self.quiet.close()
        held, self.held = self.held, None
        held.__exit__(*exc)


def waited(proc, timeout_s: float, turn: tuple[Path, Path] | None, take_turn,
           cancel: threading.Event | None = None) -> int:
    """The process's exit code, once it ends within timeout_s; where it says it is ready to measure (turn's first
    file), its turn taken (take_turn) and its go given (the second file): timeout_s to be ready, and timeout_s again
    from its go; the wait for the turn does not count."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            pass
        raise_if_signalled()
        if cancel is not None and cancel.is_set():
            raise Cancelled("the step it ran beside ended first")
        if turn and not turn[1].exists() and turn[0].exists():
            take_turn()
            turn[1].touch()
            deadline = time.monotonic() + timeout_s
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(f"measurement {proc.pid}", timeout_s)


def start_process(argv: list[str], log_path: Path, cwd: Path, env: dict, fresh: bool):
    """The measurement forked by this process's zygote where one serves it, else in a standby where one stands by
    (a fresh interpreter, started before it was needed), else in a fresh interpreter: the process (waited on and
    killed as a Popen is), which it was, and the zygote it holds until it ends."""
    if not fresh and (zygote := lease_zygote(env)) is not None:
        try:
            return zygote.start(argv, log_path, cwd, env), "forked", zygote
        except ZygoteError as e:
            release(zygote)
            log.info("benchmark: a fresh interpreter instead: %s", e)
    if (standby := take_standby(env)) is not None:
        try:
            return standby.start(argv, log_path, cwd, env), "standby", None
        except ZygoteError as e:
            log.info("benchmark: a fresh interpreter instead: %s", e)
    with open(log_path, "a") as printed:
        return subprocess.Popen([sys.executable, "-m", "quantgate.bench.worker", *argv], stdout=printed,
                                stderr=printed, cwd=cwd, env=env), "fresh", None


_zygote: dict = {"running": None, "failed_in": None}  # this process's zygote; the environment it failed in
_zygote_lock = threading.Lock()


def lease_zygote(env: dict) -> Zygote | None:
    """This process's zygote for a measurement in `env`, held until `release`: started on first use, started again
    where the environment its imports read changed and no measurement holds it; None on a host with CUDA, or where
    none can start (the run's log says why)."""
    import torch

    if torch.cuda.is_available():
        return None
    with _zygote_lock:
        current = _zygote["running"]
        if current is None or not current.serves(env):
            if _zygote["failed_in"] == imported_with(env) or (current is not None and current.users):
                return None
            if current is not None:
                current.close()
            try:
                current = _zygote["running"] = Zygote(env)
            except Exception as e:  # noqa: BLE001 - whatever stops it, a fresh interpreter measures instead
                _zygote.update(running=None, failed_in=imported_with(env))
                log.info("benchmark: fresh interpreters for this environment: %s", e)
                return None
        current.users += 1
        return current


def release(zygote: Zygote | None) -> None:
    if zygote is not None:
        with _zygote_lock:
            zygote.users -= 1


@atexit.register
def _close_zygote() -> None:
    if _zygote["running"] is not None:
        _zygote["running"].close()
    for unused in _standby["ready"]:
        unused.close()


# The next measurements' standbys, oldest first, and how many measurements time now (they are paused while any does).
_standby: dict = {"ready": [], "timing": 0}
_standby_lock = threading.Lock()
# A benchmark step starts two processes at once, its measurement and the quantize-on-load beside it: each finds one.
STANDBYS = 2


def stands_by() -> bool:
    """Whether measurements start in standbys here: where no zygote forks them, a host with CUDA."""
    import torch

    return torch.cuda.is_available()


def take_standby(env: dict) -> Standby | None:
    """The oldest standby started for measurements in `env`, if one was (None: a fresh interpreter measures); ones
    that ended or were started in another environment closed, and new ones started up to STANDBYS."""
    if not stands_by():
        return None
    with _standby_lock:
        stale = weeded(env)
        current = _standby["ready"].pop(0) if _standby["ready"] else None
        refill(env)
    for n, unused in enumerate(stale):  # out of the lock: closing waits for the process, a timing's start and end not
        log.info("benchmark: %s: %s", "a fresh interpreter instead of the standby" if n == 0 and current is None
                 else "a standby closed unused", unused.why_not(env))
        unused.close()
    return current


def prepare_standby() -> None:
    """STANDBYS standbys for the next measurements, started now where measurements start in standbys: their imports
    done by the time they are asked for."""
    if not stands_by():
        return
    env = measurement_env()
    with _standby_lock:
        stale = weeded(env)
        refill(env)
    for unused in stale:
        unused.close()


def weeded(env: dict) -> list[Standby]:
    """The pool's standbys that do not serve `env` (ended, or another environment), taken out of it. Under the lock."""
    ready = _standby["ready"]
    stale = [s for s in ready if not s.serves(env)]
    ready[:] = [s for s in ready if s not in stale]
    return stale


def refill(env: dict) -> None:
    """New standbys in `env` until the pool holds STANDBYS, or one cannot start. Under the lock."""
    while len(_standby["ready"]) < STANDBYS and (fresh := new_standby(env)) is not None:
        _standby["ready"].append(fresh)


def new_standby(env: dict) -> Standby | None:
    """A standby started in `env` (paused while a measurement times), or None where it could not start: a fresh
    interpreter then measures, as it would without standbys. Called under _standby_lock."""
    try:
        return Standby(env, paused=_standby["timing"] > 0)
    except Exception as e:  # noqa: BLE001 - an optimisation only: the run goes on without it
        log.info("benchmark: no standby started: %s: %s", type(e).__name__, e)
        return None


@contextlib.contextmanager
def timing():
    """A measurement times within: the standbys' imports wait (paused) until no measurement does."""
    with _standby_lock:
        _standby["timing"] += 1
        for waiting in _standby["ready"]:
            waiting.pause()
    try:
        yield
    finally:
        with _standby_lock:
            _standby["timing"] -= 1
            if _standby["timing"] == 0:
                for waiting in _standby["ready"]:
                    waiting.resume()


def follow(path: Path, ended: threading.Event, on_line) -> None:
    """Each line written to `path` until `ended` is set and a read after it finds nothing more."""
    with open(path, errors="replace") as f:
        pending = ""
        while True:
            done = ended.is_set()
            if chunk := f.read():
                *lines, pending = (pending + chunk).split("\n")
                for line in lines:
                    on_line(line.rstrip())
            elif done:
                break
            else:
                time.sleep(0.1)
        if pending:
            on_line(pending.rstrip())
