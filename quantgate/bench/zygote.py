"""A zygote for the benchmark's measurement processes on a host without CUDA: a process that imports torch and
transformers once, then forks each measurement from itself, so a measurement starts in about 0.1 s instead of
spending 4-5 s of CPU on imports (docs/benchmark.md, "A process of its own").

A forked measurement is a process of its own as a fresh interpreter is: its own address space, allocator, threads
and compile caches; the zygote holds no model, ran no model code and has a single thread when it forks. Where
CUDA exists the launcher starts fresh interpreters instead: importing torchao asks the device for its
capability, which initializes CUDA, and a CUDA context cannot cross a fork.

Server: `python -m quantgate.bench.zygote`, one JSON line a request on stdin, one JSON line a reply on stdout."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

# What the zygote imports before it forks: what every measurement imports, the costly part of its start.
PRELOAD = ("torch", "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "quantgate.bench.worker")
# Per measurement, not part of the imports: a request that differs from the zygote's environment only in these
# is served by it.
PER_MEASUREMENT = {"TORCHINDUCTOR_CACHE_DIR"}


class ZygoteError(RuntimeError):
    """The zygote could not start or serve a measurement; the launcher starts a fresh interpreter instead."""


# ---------------------------------------------------------------- the server

def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def serve() -> None:
    """Import PRELOAD, say whether forking is safe, then fork a measurement for each request until stdin closes;
    every measurement still running then is killed."""
    import importlib

    for module in PRELOAD:
        importlib.import_module(module)
    # A thread other than this one (OpenMP's pool, started by an import) would not exist in a child.
    threads = native_threads()
    reply({"ready": threads == 1, "threads": threads})
    if threads != 1:
        return
    running: set[int] = set()
    buffered = b""
    try:
        while True:
            readable, _, _ = select.select([0], [], [], 0.2)
            if readable:
                chunk = os.read(0, 65536)
                if not chunk:
                    break  # the launcher is gone
                buffered += chunk
                while b"\n" in buffered:
                    line, buffered = buffered.split(b"\n", 1)
                    request = json.loads(line)
                    pid = os.fork()
                    if pid == 0:
                        measure_in_child(request)  # never returns
                    running.add(pid)
                    reply({"id": request["id"], "pid": pid})
            reap(running)
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
        reap(running, block=True)


def reap(running: set[int], block: bool = False) -> None:
    for pid in list(running):
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done:
            running.discard(pid)
            if not block:
                reply({"pid": pid, "exit": os.waitstatus_to_exitcode(status)})


def reply(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def measure_in_child(request: dict) -> None:
    """In the forked child: the launcher's environment, folder and thread count, output to the measurement's log,
    then the measurement (quantgate.bench.worker.main); exits with its status."""
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        import torch

        from quantgate.bench import worker

        random.seed()  # a fresh interpreter's own seed, not the zygote's shared with every sibling
        torch.set_num_threads(request["threads"])
        worker.main(*request["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001 - whatever it was, its traceback goes to the log, as an interpreter's would
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# ---------------------------------------------------------------- the launcher's side

class Zygote:
    """The running zygote of this process, started with the environment `env`; `start` forks one measurement."""

    def __init__(self, env: dict, log: Path):
        self.env, self.log = env, log
        zygote_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no thread pool before the fork
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen([sys.executable, "-m", "quantgate.bench.zygote"], env=zygote_env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        ready = self._read()
        if not (ready or {}).get("ready"):
            self.close()
            raise ZygoteError(f"no zygote: {ready or 'it exited'}; its log: {tail(log)}")
        self.lock, self.ids = threading.Lock(), iter(range(1 << 62))
        self.forked: dict[int, threading.Event] = {}  # request id: set when its pid comes, or the zygote dies
        self.pids: dict[int, int] = {}
        self.exits: dict[int, int] = {}  # pid: exit code
        self.children: list[int] = []
        self.listener = threading.Thread(target=self._listen, daemon=True)
        self.listener.start()

    def _read(self) -> dict | None:
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def _listen(self) -> None:
        while (message := self._read()) is not None:
            if "id" in message:
                self.pids[message["id"]] = message["pid"]
                self.forked.pop(message["id"]).set()
            else:
                self.exits[message["pid"]] = message["exit"]
        for event in list(self.forked.values()):  # the zygote died: nobody waits for ever
            event.set()

    def serves(self, env: dict) -> bool:
        return self.proc.poll() is None and strip(env) == strip(self.env)

    def busy(self) -> bool:
        return self.proc.poll() is None and any(pid not in self.exits for pid in self.children)

    def start(self, argv: list[str], log: Path, cwd: Path, env: dict, threads: int) -> "Forked":
        with self.lock:
            request_id = next(self.ids)
            self.forked[request_id] = forked = threading.Event()
            self.proc.stdin.write((json.dumps({"id": request_id, "argv": argv, "log": str(log), "cwd": str(cwd),
                                               "env": env, "threads": threads}) + "\n").encode())
            self.proc.stdin.flush()
        forked.wait(30)
        if (pid := self.pids.pop(request_id, None)) is None:
            raise ZygoteError(f"the zygote did not fork the measurement; its log: {tail(self.log)}")
        self.children.append(pid)
        return Forked(self, pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it kills what still runs and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        Path(self.log).unlink(missing_ok=True)


class Forked:
    """A measurement forked by the zygote, waited on and killed as a subprocess.Popen is."""

    def __init__(self, zygote: Zygote, pid: int):
        self.zygote, self.pid = zygote, pid

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.zygote.exits.get(self.pid)) is None:
            if self.zygote.proc.poll() is not None:
                self.zygote.listener.join(timeout=5)  # its last replies
                if (code := self.zygote.exits.get(self.pid)) is not None:
                    return code
                self.kill()  # nobody is left to reap it: reported as killed
                return -signal.SIGKILL
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"measurement {self.pid}", timeout)
            time.sleep(0.05)
        return code

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def strip(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in PER_MEASUREMENT}


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(Path(path).read_text(errors="replace").splitlines()[-lines:]) or "empty"
    except OSError:
        return "unreadable"


if __name__ == "__main__":
    serve()
