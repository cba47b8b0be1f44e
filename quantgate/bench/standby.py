"""A standby for a benchmark's measurement on a host with CUDA, where no zygote forks one (quantgate.bench.zygote
says why): a fresh interpreter started before it is needed, which imports what a measurement imports, says so, and
then runs the one measurement it is asked for in itself. Its start (on the lent GPU machines, most of a fresh
process's first seconds) is off the measurement's path, and it is a fresh interpreter as any other.

Server: `python -P -m quantgate.bench.standby`: one JSON line on stdout when ready, one request on stdin."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from quantgate.bench.zygote import (ZygoteError, first_reply, imported_with, measure_here, popen_logged, preloaded,
                                    reply, tail)
from quantgate.runlog import raise_if_signalled


def stand_by() -> None:
    """Import PRELOAD, say so, then run the one measurement asked for in this process (measure_here); nothing
    asked (stdin closed): end."""
    replies = preloaded()
    reply(replies, {"ready": True})
    line = sys.stdin.readline()
    if not line:
        return  # closed unused
    code = 1
    try:
        request = json.loads(line)
        code = measure_here(request, replies, request["asked_at"], "standby")
    except BaseException:  # noqa: BLE001 - before the measurement ran: its traceback to whichever log fd 2 is
        traceback.print_exc()
    finally:
        os._exit(code)


class Standby:
    """A standby (stand_by) started with the environment `env`, importing until it says it is ready; `start` hands
    it one measurement. Paused (SIGSTOP) while a measurement is timed, its imports not sharing the host then."""

    COMMAND = [sys.executable, "-P", "-m", "quantgate.bench.standby"]

    def __init__(self, env: dict, paused: bool = False):
        self.env = env
        self.proc, self.log = popen_logged(self.COMMAND, env)
        self.paused, self.said = False, None
        if paused:
            self.pause()

    def serves(self, env: dict) -> bool:
        return self.proc.poll() is None and imported_with(env) == imported_with(self.env)

    def pause(self) -> None:
        if not self.paused and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def wait_ready(self) -> dict:
        """What it said first (ready, or why not), waited for once (first_reply)."""
        if self.said is None:
            try:
                self.said = first_reply(self.proc, raise_if_signalled) or {}
            except Exception as e:  # noqa: BLE001 - whatever it was, a fresh interpreter measures instead
                self.said = {"ready": False, "error": f"{type(e).__name__}: {e}"}
        return self.said

    def start(self, argv: list[str], log: Path, cwd: Path, env: dict) -> subprocess.Popen:
        """The measurement in this standby, once its imports are done: the process, waited on and killed as any
        Popen; ZygoteError where it cannot take it (then nothing of it runs)."""
        asked_at = time.monotonic()  # the measurement's start counts any wait for the imports (one clock: the host's)
        self.resume()
        try:
            ready = self.wait_ready()
        except BaseException:  # a stop: it goes with the run
            self.close()
            raise
        if not ready.get("ready"):
            self.close()
            raise ZygoteError(f"the standby is not ready ({ready or 'it exited or did not answer'}); its log: "
                              f"{tail(self.log)}")
        try:
            request = {"argv": argv, "log": str(log), "cwd": str(cwd), "env": env, "asked_at": asked_at}
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.close()
        except (OSError, ValueError) as e:
            self.close()
            raise ZygoteError(f"the standby cannot take a request: {e}; its log: {tail(self.log)}") from e
        self.proc.stdout.close()  # it writes no more replies
        self.log.close()  # from here its output is the measurement's, in the measurement's log
        return self.proc

    def close(self) -> None:
        """An unused standby ends, at once where it still imports (SIGTERM: it exits as asked); one that measures is
        the launcher's to wait for."""
        self.resume()
        if self.proc.poll() is None and not self.proc.stdin.closed:
            self.proc.stdin.close()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for handle in (self.proc.stdout, self.log):
            if handle is not None and not handle.closed:
                handle.close()

    def why_not(self, env: dict) -> str:
        """Why it does not serve a measurement in `env`: it ended, or the import-time variables that differ."""
        if (code := self.proc.poll()) is not None:
            return f"it ended (exit code {code}); its log: {tail(self.log)}"
        mine, theirs = imported_with(self.env), imported_with(env)
        return "started with other import-time variables: " + ", ".join(
            sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k)))


if __name__ == "__main__":
    stand_by()
