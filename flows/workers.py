"""Recipes gated side by side (`model.recipes_at_once`). Loading a model changes process-wide state (torch's default
dtype, its init functions), so two recipes cannot compute in threads of one process: each recipe gets a worker
process of its own, and its model steps run there. The flow process keeps the Prefect task runs, their timeouts and
the run's record; a worker's log records come back into the task run that called it, and so into the run's log."""
from __future__ import annotations

import contextvars
import functools
import logging
import multiprocessing
import pickle
import signal
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor

from quantgate.runlog import INFO_LOGGERS, Stopped

log = logging.getLogger("quantgate.workers")
_current: contextvars.ContextVar[Worker | None] = contextvars.ContextVar("quantgate_worker", default=None)
_live: set[Worker] = set()
_stopping = threading.Event()


class WorkerGone(RuntimeError):
    """The worker process ended before it answered: killed, or out of memory."""


class Worker:
    """A process that runs the step functions it is sent, one at a time, sending back their results and log records."""

    def __init__(self, label: str):
        self.label, self.process, self.conn = label, None, None
        self.closing = threading.Lock()

    def start(self) -> None:
        if _stopping.is_set():
            raise Stopped("the run is stopping")
        spawn = multiprocessing.get_context("spawn")  # fork would copy the flow's threads and Prefect's clients
        self.conn, child = spawn.Pipe()
        self.process = spawn.Process(target=serve, args=(child,), name=f"quantgate-{self.label}")
        self.process.start()
        child.close()
        _live.add(self)
        log.info("%s: worker process %d started", self.label, self.process.pid)

    def call(self, fn, args: tuple, kwargs: dict):
        """fn(*args, **kwargs) in the worker; its log records replayed here as they come, its exception raised here."""
        if self.process is None:
            self.start()
        try:
            self.conn.send((fn, args, kwargs))
            kind, payload = self.receive()
            while kind == "log":
                replay(payload)
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
                if not process.is_alive():
                    self.gone(process)
            return conn.recv()
        except (EOFError, OSError):  # the process ended, or a stop closed its pipe
            process.join(5)
            self.gone(process)

    def gone(self, process):
        if _stopping.is_set():
            raise Stopped("the run is stopping")
        raise WorkerGone(f"{self.label}'s worker process ended (exit code {process.exitcode}) during the step")

    def close(self, wait_s: float = 10) -> None:
        """Its pipe closed, which ends an idle worker's loop; terminated where it has not ended within wait_s."""
        with self.closing:  # its recipe's thread and a stop may close it at once
            process, self.process = self.process, None
            if process is None:
                return
            self.conn.close()
            process.join(wait_s)
            if process.is_alive():
                process.terminate()
                process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
            _live.discard(self)


def in_worker(fn):
    """fn, run by the calling recipe's worker process where it has one (recipes side by side), here otherwise."""
    @functools.wraps(fn)
    def step(*args, **kwargs):
        worker = _current.get()
        return fn(*args, **kwargs) if worker is None else worker.call(fn, args, kwargs)
    return step


def each_recipe(recipes: list, at_once: int, gate) -> None:
    """gate(recipe) for every recipe: one after another, or up to `at_once` at a time, each in its own worker."""
    if at_once == 1 or len(recipes) < 2:
        for recipe in recipes:
            gate(recipe)
        return
    free_cached_memory()
    pool = ThreadPoolExecutor(min(at_once, len(recipes)), thread_name_prefix="recipe")
    # A copy of the flow's context per recipe: Prefect's run context travels in it, and one copy runs in one thread.
    futures = [pool.submit(contextvars.copy_context().run, in_own_worker, gate, recipe) for recipe in recipes]
    try:
        for future in futures:
            future.result()
    except BaseException:  # Ctrl-C, SIGTERM: the workers end, and the recipes not begun never start
        _stopping.set()
        for worker in list(_live):
            worker.close(wait_s=0)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        _stopping.clear()  # every recipe's thread has ended


def free_cached_memory() -> None:
    """What this process's steps (the reference's) left in torch's CUDA cache, handed back for the workers' models."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def in_own_worker(gate, recipe) -> None:
    if _stopping.is_set():
        raise Stopped("the run is stopping")
    worker = Worker(recipe.name)
    token = _current.set(worker)
    try:
        gate(recipe)
    except Exception:
        raise
    except BaseException:  # a stop: before this thread takes the next recipe
        _stopping.set()
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
        try:
            pickle.dumps(fields)
        except Exception:  # noqa: BLE001 - an `extra=` value that does not pickle: the record without extras
            fields = {k: fields[k] for k in ("name", "levelno", "levelname", "msg", "created", "exc_text")}
        self.send(("log", fields))


def serve(conn) -> None:
    """The worker's loop: a call in, its result or exception out; its log records and prints forwarded meanwhile."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the flow's: it ends this process
    lock = threading.Lock()  # a library's thread may log while the step sends its result

    def send(message) -> None:
        with lock:
            conn.send(message)

    forward_logs(send)
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


def forward_logs(send) -> None:
    """The worker's records, Python warnings and prints forwarded, at the levels the run's log keeps (runlog.to_file)."""
    from transformers.utils import logging as hf_logging

    from quantgate.terminal import LogStream

    root = logging.getLogger()
    root.handlers[:] = [Forward(send)]
    for name in INFO_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    logging.captureWarnings(True)
    sys.stdout, sys.stderr = LogStream("stdout"), LogStream("stderr")


def portable(error: BaseException) -> BaseException:
    """The exception itself where it pickles; else a RuntimeError that names its type and message."""
    try:
        pickle.dumps(error)
        type(error)(*error.args)  # what the flow's side does to rebuild it
        return error
    except Exception:  # noqa: BLE001 - a library's exception class with required arguments, or unpicklable state
        return RuntimeError(f"{type(error).__name__}: {error}")
