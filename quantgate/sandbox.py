"""Running model-written code: each program in its own Python process, in an empty temporary folder, with an
empty environment, limits on CPU time, memory, file size and open files, a wall-clock limit that kills its
whole process group, and no network where `unshare -n` can take it away (a user namespace without one)."""
from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile

MEMORY_BYTES = 2 << 30
FILE_BYTES = 16 << 20


@functools.cache
def network_isolation() -> list[str]:
    """`unshare -n` (or `unshare -rn` without root) where this machine allows it; otherwise nothing."""
    for command in (["unshare", "-n"], ["unshare", "-rn"]):
        if shutil.which("unshare") and subprocess.run([*command, "true"], capture_output=True).returncode == 0:
            return command
    return []


def _limits(cpu_s: int) -> None:
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def passes(program: str, timeout_s: float = 10.0) -> bool:
    """Whether `program` runs to exit status 0 within `timeout_s` seconds."""
    with tempfile.TemporaryDirectory(prefix="quantgate-sandbox-") as folder:
        path = os.path.join(folder, "program.py")
        with open(path, "w") as f:
            f.write(program)
        child = subprocess.Popen([*network_isolation(), sys.executable, "-I", "-S", path], cwd=folder, env={},
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True, preexec_fn=lambda: _limits(int(timeout_s) + 1))
        try:
            return child.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            try:  # what the program started goes with it
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
