"""A zygote for the benchmark's measurement processes on a host without CUDA: a process that imports torch and
transformers once, then forks each measurement from itself, so a measurement starts in about 0.1 s instead of
spending 4-5 s of CPU on imports (docs/benchmark.md, "A process of its own").

A forked measurement is a process of its own: its own address space, allocator, threads and compile caches; the
zygote holds no model, ran no model code and has a single thread when it forks. Where CUDA exists the launcher
starts fresh interpreters instead: importing torchao asks the device for its capability, which initializes CUDA,
and a CUDA context cannot cross a fork.

Server: `python -P -m quantgate.bench.zygote`, one JSON line a request on stdin, one JSON line a reply on the
descriptor it was started with as stdout (its own stdout then goes to its log, with whatever an import prints)."""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import IO

# What the zygote imports before it forks: what every measurement imports, the costly part of its start.
PRELOAD = ("torch", "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "quantgate.bench.worker")
# The environment the zygote's imports may have read (thread pools, library settings, the interpreter's own): a
# measurement whose environment differs in one of these gets a zygote of its own. The rest (a test's name, Prefect's
# settings) the child takes as it is, as a library reads it when it is used.
READ_AT_IMPORT = ("OMP_", "MKL_", "OPENBLAS_", "KMP_", "GOMP_", "TORCH", "PYTORCH_", "CUDA_", "NVIDIA_", "TRITON_",
                  "TRANSFORMERS_", "HF_", "HUGGINGFACE_", "TOKENIZERS_", "PYTHON", "LD_", "TMP", "TEMP", "LANG", "QUANTGATE_",
                  "LC_", "HOME", "XDG_", "PATH")
PER_MEASUREMENT = {"TORCHINDUCTOR_CACHE_DIR"}  # read when inductor first compiles, in the child
READY_S = 300  # the imports, on a loaded machine
PR_SET_PDEATHSIG = 1


class ZygoteError(RuntimeError):
    """The zygote could not start or serve a measurement; the launcher starts a fresh interpreter instead."""


# ---------------------------------------------------------------- the server

def preloaded() -> int:
    """A server's start (the zygote's, a standby's): SIGTERM ends it, its stdout goes to its log and PRELOAD is
    imported; the descriptor its replies go to."""
    import importlib

    replies = os.dup(1)
    os.dup2(2, 1)  # what an import prints goes to the log, not into the replies
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    for module in PRELOAD:
        importlib.import_module(module)
    return replies


def serve() -> None:
    """Import PRELOAD, say whether forking is safe, then fork a measurement for each request until stdin closes or
    SIGTERM comes; every measurement still running then is killed."""
    replies = preloaded()
    import torch

    threads = len(os.listdir("/proc/self/task"))  # another thread (an OpenMP pool) would not exist in a child
    cuda = torch.cuda.is_initialized()
    reply(replies, {"ready": threads == 1 and not cuda, "threads": threads, "cuda_initialized": cuda})
    if threads != 1 or cuda:
        return
    running: dict[int, int] = {}  # pid: request id
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
                    zygote = os.getpid()
                    pid = os.fork()
                    if pid == 0:
                        measure_in_child(request, replies, zygote)  # never returns
                    running[pid] = request["id"]
                    reply(replies, {"id": request["id"], "pid": pid})
            reap(running, replies)
    finally:
        for pid in running:
            os.kill(pid, signal.SIGKILL)
        reap(running, replies, block=True)


def reap(running: dict[int, int], replies: int, block: bool = False) -> None:
    for pid in list(running):
        done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
        if done:
            request_id = running.pop(pid)
            if not block:
                reply(replies, {"id": request_id, "exit": os.waitstatus_to_exitcode(status)})


def reply(fd: int, message: dict) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def measure_in_child(request: dict, replies: int, zygote: int) -> None:
    """In the forked child: killed with the zygote; then the measurement (measure_here)."""
    code = 1
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote:  # it died before the death signal was asked for
            return
        code = measure_here(request, replies, how="forked")
    finally:
        os._exit(code)


def measure_here(request: dict, replies: int, asked_at: float | None = None, how: str = "forked") -> int:
    """In the process that measures: the launcher's environment and folder, output to the measurement's log; then
    the measurement (quantgate.bench.worker.main), its exit code as an interpreter's."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.close(replies)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    return run_as_interpreter(request, asked_at, how)


def run_as_interpreter(request: dict, asked_at: float | None = None, how: str = "forked") -> int:
    """The measurement, with a fresh interpreter's seeds and thread count (where the request names one: a forked
    child's), its exit code as Python would give it."""
    import atexit
    import random

    import torch

    from quantgate.bench import worker

    random.seed()  # a fresh interpreter's own seeds, not the zygote's, shared with every sibling
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if request.get("threads"):
        torch.set_num_threads(request["threads"])
    code = 0
    try:
        worker.main(*request["argv"], asked_at=asked_at, how=how)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 - whatever it was, its traceback goes to the log, as an interpreter's would
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # noqa: SLF001 - what an interpreter runs at its end (logging's flush among them)
    sys.stdout.flush()
    sys.stderr.flush()
    return code


# ---------------------------------------------------------------- the launcher's side

class Zygote:
    """A running zygote, started with the environment `env`; `start` forks one measurement."""

    COMMAND = [sys.executable, "-P", "-m", "quantgate.bench.zygote"]  # -P: no folder of the launcher on sys.path

    def __init__(self, env: dict, log: Path | None = None):
        """`log`: where the zygote's own output goes (by default a temporary file: popen_logged)."""
        self.env = env
        self.threads = default_threads(env)
        zygote_env = {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # no thread pool before the fork
        self.proc, self.log = popen_logged(self.COMMAND, zygote_env, log)
        ready = self._ready()
        if not (ready or {}).get("ready"):
            why = f"no zygote ({ready or 'it exited or did not answer'}); its log: {tail(self.log)}"
            self.close()
            raise ZygoteError(why)
        self.lock, self.ids = threading.Lock(), iter(range(1 << 62))
        self.forked: dict[int, threading.Event] = {}  # request id: set when its pid comes, or the zygote dies
        self.pids: dict[int, int] = {}  # request id: pid
        self.exits: dict[int, int] = {}  # request id: exit code
        self.abandoned: set[int] = set()  # requests whose pid came too late: killed when it comes
        self.users = 0  # measurements started or about to start: the zygote is not closed under them
        self.listener = threading.Thread(target=self._listen, daemon=True)
        self.listener.start()

    def _ready(self) -> dict | None:
        return first_reply(self.proc)

    def _listen(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            request_id = message["id"]
            if "pid" not in message:
                self.exits[request_id] = message["exit"]
                continue
            self.pids[request_id] = message["pid"]
            with self.lock:
                event = self.forked.pop(request_id, None)
                late = request_id in self.abandoned
            if late:
                kill(message["pid"])  # its launcher already started a fresh interpreter for it
            elif event is not None:
                event.set()
        for event in list(self.forked.values()):  # the zygote died: nobody waits for ever
            event.set()

    def serves(self, env: dict) -> bool:
        return self.proc.poll() is None and imported_with(env) == imported_with(self.env)

    def start(self, argv: list[str], log: Path, cwd: Path, env: dict) -> "Forked":
        """Fork a measurement; ZygoteError where the zygote cannot (then nothing of it runs)."""
        with self.lock:
            request_id = next(self.ids)
            self.forked[request_id] = forked = threading.Event()
            try:
                self.proc.stdin.write((json.dumps({"id": request_id, "argv": argv, "log": str(log), "cwd": str(cwd),
                                                   "env": env, "threads": self.threads}) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # it died, or was closed
                raise ZygoteError(f"the zygote cannot take a request: {e}; its log: {tail(self.log)}") from e
        forked.wait(60)
        with self.lock:
            if (pid := self.pids.get(request_id)) is None:
                self.abandoned.add(request_id)
                raise ZygoteError(f"the zygote did not fork the measurement; its log: {tail(self.log)}")
        return Forked(self, request_id, pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # it kills what still runs and exits
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def popen_logged(command: list[str], env: dict, log: Path | None = None) -> tuple[subprocess.Popen, IO]:
    """`command` with pipes to and from it, its own output (what an import prints) to `log`, read through the handle
    returned. By default a temporary file, unlinked as soon as it is open: nothing is left in /tmp however this
    process ends (a SIGKILLed run left one)."""
    temporary = log is None
    if temporary:
        fd, name = tempfile.mkstemp(prefix="quantgate-zygote-", suffix=".log")
        os.close(fd)
        log = Path(name)
    try:
        with open(log, "w") as stderr:
            proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr)
        return proc, open(log, errors="replace")  # noqa: SIM115 - read until close()
    finally:
        if temporary:
            log.unlink(missing_ok=True)


def first_reply(proc: subprocess.Popen, check=None) -> dict | None:
    """The first JSON line a zygote or standby writes (that it is ready), waited for up to READY_S; `check()` is
    called every half second meanwhile (a run's stop raises there)."""
    deadline = time.monotonic() + READY_S
    while not select.select([proc.stdout], [], [], 0.5)[0]:
        if check is not None:
            check()
        if time.monotonic() > deadline:
            return None
    line = proc.stdout.readline()
    try:
        return json.loads(line) if line else None
    except ValueError:
        return {"ready": False, "said": line[:200].decode(errors="replace")}


class Forked:
    """A measurement forked by the zygote, waited on and killed as a subprocess.Popen is."""

    def __init__(self, zygote: Zygote, request_id: int, pid: int):
        self.zygote, self.request_id, self.pid = zygote, request_id, pid

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.zygote.exits.get(self.request_id)) is None:
            if self.zygote.proc.poll() is not None:
                self.zygote.listener.join(timeout=5)  # its last replies
                if (code := self.zygote.exits.get(self.request_id)) is not None:
                    return code
                return -signal.SIGKILL  # its zygote died, and its death signal killed it
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"measurement {self.pid}", timeout)
            time.sleep(0.05)
        return code

    def kill(self) -> None:
        if self.zygote.proc.poll() is None:  # else the pid is no longer its child, and may be another's
            kill(self.pid)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def imported_with(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith(READ_AT_IMPORT) and k not in PER_MEASUREMENT}


def default_threads(env: dict) -> int:
    """The torch threads a fresh interpreter in `env` runs: MKL_NUM_THREADS, else OMP_NUM_THREADS (torch's order),
    else what torch chooses on this host, asked of a fresh interpreter."""
    for name in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        if (value := env.get(name, "").split(",")[0].strip()).isdigit() and int(value) > 0:
            return int(value)
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env=env,
                           capture_output=True, text=True, timeout=READY_S)
    return int(probe.stdout.split()[-1]) if probe.returncode == 0 and probe.stdout.split() else os.cpu_count() or 1


def tail(log, lines: int = 5) -> str:
    """The last lines of an open log, read from its start without moving it (callers may overlap)."""
    try:
        fd = log.fileno()
        text = os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")
        return " | ".join(text.splitlines()[-lines:]) or "empty"
    except (OSError, ValueError):  # ValueError: the handle was closed
        return "unreadable"


if __name__ == "__main__":
    serve()
