"""The suite's one Prefect server (`prefect_server` in tests/conftest.py), started as prefect_test_harness starts
one (uvicorn on Prefect's app, a SQLite database of its own) but shared by the xdist workers: the first worker to ask
starts it, detached, and writes where it listens into the run's shared temp folder; the others read it there.
pytest's controller stops it when the session ends (`stop`); a supervisor beside it stops it if the controller is
gone first (a SIGKILLed pytest leaves no server behind)."""
import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
INFO = "prefect-server.json"


def shared_root(basetemp: Path) -> Path:
    """The folder every process of the run sees: the controller's basetemp (a worker's is a folder inside it)."""
    return basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp


def controller_pid() -> int:
    return os.getppid() if os.environ.get("PYTEST_XDIST_WORKER") else os.getpid()


def url_of(basetemp: Path) -> str:
    """The shared server's API URL, the server started here first if no process of the run has started it."""
    from filelock import FileLock

    root = shared_root(basetemp)
    info = root / INFO
    with FileLock(str(info) + ".lock"):
        if not info.is_file():
            info.write_text(json.dumps(start(root / "prefect-server", controller_pid())))
        return json.loads(info.read_text())["url"]


def start(folder: Path, watched: int, timeout_s: float = 120, tries: int = 3) -> dict:
    """The server under its supervisor, in a process group of its own; returns once it answers /api/health (on
    another port where the one picked was taken meanwhile, as Prefect's temporary server does)."""
    from prefect.settings import get_current_settings

    from tests.conftest import free_port

    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT_UI_ENABLED": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",  # what Prefect's temporary server sets
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}"}
    env.pop("PREFECT_API_URL", None)
    for _ in range(tries):
        port = free_port()
        with open(folder / "server.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tests.prefect_server", str(watched), str(port)],
                                    cwd=PROJECT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        url, deadline = f"http://127.0.0.1:{port}/api", time.monotonic() + timeout_s
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    return {"url": url, "pgid": proc.pid}
            except OSError:
                time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):  # ended by itself (its port taken): nothing left to stop
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    raise RuntimeError(f"the suite's Prefect server did not start: {(folder / 'server.log').read_text()[-2000:]}")


def drain_workers() -> None:
    """Prefect's log and event workers' queues sent, as prefect_test_harness sends them before its server stops."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def drain():
        for drained in (lambda: APILogWorker.instance().drain(), EventsWorker.drain_all):
            with contextlib.suppress(RuntimeError):  # a worker that was never started
                if inspect.isawaitable(result := drained()):
                    await result

    run_coro_as_sync(drain())


def stop(basetemp: Path) -> None:
    """The shared server stopped, where this run started one (called by the controller as the session ends)."""
    info = shared_root(basetemp) / INFO
    if info.is_file():
        with contextlib.suppress(ProcessLookupError):  # stopped by its supervisor already
            os.killpg(json.loads(info.read_text())["pgid"], signal.SIGTERM)


def supervise(watched: int, port: int) -> None:
    """uvicorn as Prefect's own temporary server runs it, stopped when `watched` (pytest's controller) is gone."""
    import prefect

    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                               "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "error", "--lifespan", "on"])
    signal.signal(signal.SIGTERM, lambda *_: (server.terminate(), sys.exit(0)))
    while server.poll() is None:
        try:
            os.kill(watched, 0)
        except ProcessLookupError:
            server.terminate()
            break
        time.sleep(1)
    server.wait(timeout=10)


if __name__ == "__main__":
    supervise(int(sys.argv[1]), int(sys.argv[2]))
