"""Recipes gated side by side (`model.recipes_at_once`). Loading a model changes process-wide state (torch's default
dtype, its init functions), so two recipes cannot compute in threads of one process: each recipe gets a worker
process of its own, and its model steps run there. The flow process keeps the Prefect task runs, their timeouts and
the run's record; a worker's log records come back into the task run that called it, and so into the run's log.
Workers are started with `spawn`: a script that gates recipes side by side needs an `if __name__ == "__main__"`
guard."""
from __future__ import annotations

import contextvars
import functools
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

import psutil

from quantgate.runlog import libraries_to_root, raise_if_signalled, stop_children, stop_requested

log = logging.getLogger("quantgate.workers")
_current: contextvars.ContextVar[Worker | None] = contextvars.ContextVar("quantgate_worker", default=None)
_live: set[Worker] = set()
_starting = threading.Lock()  # a stop either sees a worker in _live or the worker sees the stop


class WorkerGone(RuntimeError):
    """The worker process ended before it answered: killed, or out of memory."""


class Worker:
    """A process that runs the step functions it is sent, one at a time, sending back their results and log records."""

    def __init__(self, label: str, threads: int = 0):
        self.label, self.threads, self.process, self.conn = label, threads, None, None
        self.closing = threading.Lock()

    def start(self) -> None:
        from flows.devices import TURNS  # here, not at the top: a worker process imports this module, not Prefect

        spawn = multiprocessing.get_context("spawn")  # fork would copy the flow's threads and Prefect's clients
        with _starting:
            raise_if_signalled()
            self.conn, child = spawn.Pipe()
            self.process = spawn.Process(target=serve, args=(child, self.threads, TURNS.wanted),
                                         name=f"quantgate-{self.label}")
            self.process.start()
            _live.add(self)
        child.close()
        log.info("%s: worker process %d started", self.label, self.process.pid)

    def call(self, fn, args: tuple, kwargs: dict):
        """fn(*args, **kwargs) in the worker; its log records replayed here as they come, its exception raised here."""
        if self.process is None:
            self.start()
        try:
            self.conn.send((fn, args, kwargs))
            kind, payload = self.receive()
            while kind in ("log", "give_way"):
                if kind == "log":
                    replay(payload)
                else:  # the step is at a point where it can wait while a benchmark of this run times
                    from flows.devices import give_way_here
                    give_way_here()
                    self.conn.send(("go_on", None))
                kind, payload = self.receive()
        except BaseException:  # a timeout, a stop, the process gone: a step left mid-way, whose process is not reused
            self.close(wait_s=0)
            raise
        if kind == "error":
            raise payload
        return payload

    def receive(self):
        conn, process = self.conn, self.process  # a stop may close the worker meanwhile
        try:
            while not conn.poll(0.5):  # short waits: a task's timeout or a stop lands between them
                raise_if_signalled()
                if not process.is_alive():
                    self.gone(process)
            return conn.recv()
        except (EOFError, OSError):  # the process ended, or a stop closed its pipe
            process.join(5)
            self.gone(process)

    def gone(self, process):
        raise_if_signalled()
        raise WorkerGone(f"{self.label}'s worker process ended (exit code {process.exitcode}) during the step")

    def close(self, wait_s: float = 10) -> None:
        """Its pipe closed, which ends an idle worker's loop; where it has not ended within wait_s, it and what it
        started (a benchmark's own process) are killed: the worker ignores SIGTERM, so its end is the flow's."""
        with self.closing:  # its recipe's thread and a stop may close it at once
            process, self.process = self.process, None
            if process is None:
                return
            self.conn.close()
            process.join(wait_s)
            if process.is_alive():
                kill_tree(process.pid)
                process.join()
            _live.discard(self)


def kill_tree(pid: int) -> None:
    """What the worker started, then the worker (which ignores SIGTERM)."""
    try:
        root = psutil.Process(pid)
        stop_children(parent=root)
        root.kill()
    except psutil.NoSuchProcess:
        pass


def in_worker(fn):
    """fn, run by the calling recipe's worker process where it has one (recipes side by side), here otherwise."""
    @functools.wraps(fn)
    def step(*args, **kwargs):
        worker = _current.get()
        return fn(*args, **kwargs) if worker is None else worker.call(fn, args, kwargs)
    return step


class ThreadTimeouts(logging.Filter):
    """Prefect warns, for every task with a timeout run outside the main thread, that its timeout cannot interrupt a
    blocking call; the wait for a worker blocks half a second at a time, so the timeout does interrupt it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout of")


def each_recipe(recipes: list, at_once: int, gate, first=None) -> None:
    """first() (the reference's steps), then gate(recipe) for every recipe: one after another, or up to `at_once`
    at a time, each in its own worker, first() beside them in a worker of its own. One recipe's error leaves the
    others running; Ctrl-C or SIGTERM ends every worker and starts no more recipes."""
    if at_once == 1 or len(recipes) < 2:
        if first is not None:
            first()
        for recipe in recipes:
            gate(recipe)
        return
    import torch

    stop_requested.clear()  # a stop of an earlier call cut short by a second Ctrl-C
    # The host's cores shared out: on 2 cores, two recipes of 2 threads each ran validate five times slower than
    # alone (docs/nightly.md). A benchmark's own process keeps every core while it times: it times alone.
    threads = max(1, torch.get_num_threads() // (min(at_once, len(recipes)) + (first is not None)))
    quiet = ThreadTimeouts()
    logging.getLogger("prefect.task_runs").addFilter(quiet)
    # first() in a thread of its own: in the recipes' pool, its thread would take a recipe after it, one too many.
    pool, aside = ThreadPoolExecutor(min(at_once, len(recipes)), thread_name_prefix="recipe"), ThreadPoolExecutor(1)
    try:
        # A copy of the flow's context per thread: Prefect's run context travels in it; one copy runs in one thread.
        futures = {"the reference": aside.submit(contextvars.copy_context().run, in_own_worker, "reference", first,
                                                 threads)} if first else {}
        futures.update({recipe.name: pool.submit(contextvars.copy_context().run, in_own_worker, recipe.name,
                                                 functools.partial(gate, recipe), threads) for recipe in recipes})
        errors = [(name, error) for name, future in futures.items() if (error := future.exception())]
    except BaseException:  # Ctrl-C, SIGTERM
        stop_workers()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        aside.shutdown(wait=True)
        stop_requested.clear()  # every recipe's thread has ended
        logging.getLogger("prefect.task_runs").removeFilter(quiet)
    if not errors:
        return
    # A stop first: the flow marks the run interrupted only for one. The other errors go to the log.
    first_error = next((e for _, e in errors if not isinstance(e, Exception)), errors[0][1])
    for name, error in errors:
        if error is not first_error and isinstance(error, Exception):
            log.error("%s: %s: %s", name, type(error).__name__, error)
    raise first_error


def stop_workers() -> None:
    with _starting:
        stop_requested.set()
        workers = list(_live)
    for worker in workers:
        worker.close(wait_s=0)


def free_cached_memory() -> None:
    """What this process's steps left in torch's CUDA cache (the reference's), handed back for the other models."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def leave_worker() -> None:
    """The calling thread's worker closed before its work ends; its later steps run here (the reference's benchmark
    needs none, and an idle worker would hold its CUDA context and host memory meanwhile)."""
    worker = _current.get()
    if worker is not None:
        _current.set(None)
        worker.close()


def renew_worker() -> None:
    """The calling thread's worker closed, its next step in a new one: after a step that may have left its process
    unusable (a CUDA device-side assert poisons the context)."""
    if (worker := _current.get()) is not None:
        worker.close()


def in_own_worker(name: str, work, threads: int) -> None:
    """work(), its model steps in a worker process of its own, named `name` in the log."""
    raise_if_signalled()
    worker = Worker(name, threads)
    token = _current.set(worker)
    try:
        work()
    except Exception:
        raise
    except BaseException:  # a stop: before this thread takes the next recipe
        stop_workers()
        raise
    finally:
        _current.reset(token)
        worker.close()


def replay(fields: dict) -> None:
    """A worker's log record handled here as if logged here: the run's log, and the task run's logs in Prefect."""
    record = logging.makeLogRecord(fields)
    logging.getLogger(record.name).handle(record)


class Forward(logging.Handler):
    """Each record sent to the flow process, its message formatted here: arguments may not pickle."""

    def __init__(self, send):
        super().__init__(logging.INFO)
        self.send = send

    def emit(self, record: logging.LogRecord) -> None:
        fields = dict(record.__dict__, msg=record.getMessage(), args=None, exc_info=None)
        if record.exc_info:
            fields["exc_text"] = "".join(traceback.format_exception(*record.exc_info))
        if not pickles(fields):  # an `extra=` value that does not pickle: the record goes without it
            fields = {k: v for k, v in fields.items() if pickles(v)}
        self.send(("log", fields))


def pickles(value) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001 - whatever a library passed
        return False


def serve(conn, threads: int, wanted=None) -> None:
    """The worker's loop: a call in, its result or exception out; its log records and prints forwarded meanwhile.
    `threads`: torch's CPU threads here (0: its default). `wanted`: set while a step of the run waits to time alone;
    a step then gives way at its next point (quantgate.sharing), asking the flow when to go on."""
    import torch

    from quantgate.sharing import ways_to_give

    if threads:
        torch.set_num_threads(threads)
    # Ctrl-C and a SIGTERM to the process group are the flow's: it ends the workers (Worker.close) once it has
    # recorded why. A handler that does nothing, not SIG_IGN: what the worker starts (a benchmark's process) gets the
    # default again at exec, so a SIGTERM still ends it.
    signal.signal(signal.SIGINT, ignored)
    signal.signal(signal.SIGTERM, ignored)
    lock = threading.Lock()  # a library's thread may log while the step sends its result

    def send(message) -> None:
        with lock:
            conn.send(message)

    def went_on() -> None:
        send(("give_way", None))
        conn.recv()  # ("go_on", None): the benchmark has timed

    forward_logs(send)
    if wanted is not None:
        ways_to_give(wanted.is_set, went_on)
    while True:
        try:
            fn, args, kwargs = conn.recv()
        except EOFError:  # the flow closed the pipe
            return
        try:
            send(("result", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - every way a step ends goes back to the flow
            log.info("%s raised in the worker:\n%s", fn.__name__, traceback.format_exc())
            send(("error", portable(e)))
        free_cached_memory()  # an idle worker holds no GPU memory while another recipe's benchmark measures


def ignored(signum, frame) -> None:
    pass


def forward_logs(send) -> None:
    """The worker's records, Python warnings and prints forwarded, at the levels the run's log keeps
    (runlog.to_file)."""
    from quantgate.terminal import LogStream

    logging.getLogger().handlers[:] = [Forward(send)]
    libraries_to_root()  # for the worker's life: not undone
    sys.stdout, sys.stderr = LogStream("stdout"), LogStream("stderr")
    for fd, name in ((1, "stdout"), (2, "stderr")):  # what writes to the descriptors (torch's own log handlers, C++)
        captured(fd, LogStream(name))


def captured(fd: int, stream) -> None:
    """The descriptor made the write end of a pipe whose lines a thread hands to `stream`."""
    read, write = os.pipe()
    os.dup2(write, fd)
    os.close(write)

    def pump() -> None:
        with os.fdopen(read, "r", errors="replace", newline="") as lines:  # a bar's \r redraws kept for LogStream
            for line in lines:
                stream.write(line)

    threading.Thread(target=pump, name=f"quantgate-fd{fd}", daemon=True).start()


def portable(error: BaseException) -> BaseException:
    """The exception itself where it pickles; else a RuntimeError that names its type and message, as for a step's
    SystemExit, which the flow would take for a stop."""
    named = RuntimeError(f"{type(error).__name__}: {error}")
    if not isinstance(error, Exception):
        return named
    try:
        pickle.dumps(error)
        type(error)(*error.args)  # what the flow's side does to rebuild it
        return error
    except Exception:  # noqa: BLE001 - a library's exception class with required arguments, or unpicklable state
        return named
