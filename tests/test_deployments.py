"""The deployments for real: a Prefect server on 127.0.0.1, process workers, `prefect deploy`, the
`quantize` deployment run with quick settings, and a nightly matrix of two cells shared by two workers.
Everything started here is stopped at the end. The model is the tiny Llama: what is tested is the server, the
workers and the deployments, each running the whole flow; the real models' flow is the session's (test_flow.py)."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from quantgate import history
from tests.conftest import PROJECT, QUICK

PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.integration  # a Prefect server, workers and deployments, though on the tiny model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "quantgate",
           "PYTHONUNBUFFERED": "1"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"the Prefect server did not start: {(home / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
    workers = []

    def start_worker(name: str, pool: str = "quantgate"):
        out = home / f"{name}.log"
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", "1"],
                                        env=env, cwd=PROJECT, stdout=open(out, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True))
        return workers[-1], out

    for pool in ("quantgate", "quantgate-control"):
        subprocess.run([PREFECT, "work-pool", "create", pool, "--type", "process"], env=env, check=True,
                       capture_output=True)
    deploy = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=PROJECT, capture_output=True,
                            text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    yield {"env": env, "start_worker": start_worker, "home": home}
    stop([*workers, proc])


def stop(processes) -> None:
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, 15)
    for p in processes:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a worker waiting on its last poll: nothing left to lose
            os.killpg(p.pid, 9)


def quick(tmp: Path, cache_dir: Path, model: Path) -> list[str]:
    return [f"model.source={model}", "model.dtype=float32",
            f"output.runs_dir={tmp / 'runs'}", f"output.cache_dir={cache_dir}", f"output.history_db={tmp / 'h.sqlite'}",
            # The same settings in every run here: the reference the first run measured comes from the cache after.
            *QUICK,
            f"steps.publish.registry_dir={tmp / 'registry'}"]


def test_quantize_deployment_runs_and_leaves_its_record(server, tiny_llama, cache_dir, tmp_path):
    worker, _ = server["start_worker"]("solo")
    params = {"config_path": str(PROJECT / "configs" / "default.yaml"),
              "overrides": [*quick(tmp_path, cache_dir, tiny_llama), "recipes=[torchao-int8-weight-only]"]}
    run = subprocess.run([PREFECT, "deployment", "run", "quantize-model/quantize", "--params", json.dumps(params),
                          "--watch", "--watch-timeout", "900"], env=server["env"], capture_output=True, text=True,
                         timeout=960)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "passed"
    assert metrics["recipes"]["torchao-int8-weight-only"]["steps"]["publish"]["status"] == "ok"
    assert [c["run_id"] for c in history.cells(tmp_path / "h.sqlite")] == [metrics["run_id"]]
    stop([worker])


def test_two_workers_share_a_nightly_matrix(server, tiny_llama, cache_dir, tmp_path):
    logs = [server["start_worker"](f"gpu{i}")[1] for i in (0, 1)]
    matrix = tmp_path / "nightly.yaml"
    matrix.write_text(yaml.safe_dump({
        "models": [{"config": str(PROJECT / "configs" / "default.yaml"), "overrides": quick(tmp_path, cache_dir, tiny_llama)}],
        # Two cells, one for each worker.
        "recipes": ["quanto-int8", "torchao-int8-weight-only"],
        "deployment": "quantize-model/quantize", "history_db": str(tmp_path / "h.sqlite"),
        "dashboard": str(tmp_path / "dashboard.html")}))
    nightly = subprocess.run([sys.executable, "-c", f"from flows.nightly import nightly; print(nightly({str(matrix)!r}))"],
                             env=server["env"], cwd=PROJECT, capture_output=True, text=True, timeout=1500)
    assert nightly.returncode == 0, nightly.stdout[-3000:] + nightly.stderr[-3000:]
    nightly_id = nightly.stdout.strip().splitlines()[-1]
    runs = history.nightly_runs(tmp_path / "h.sqlite", nightly_id)
    assert len(runs) == 2
    assert {c["recipe"] for c in history.cells(tmp_path / "h.sqlite")} == {"quanto-int8", "torchao-int8-weight-only"}
    # Both workers took cells.
    for log, name in zip(logs, ("gpu0", "gpu1")):
        assert f"Worker '{name}' submitting flow run" in log.read_text(), log.read_text()[-2000:]
    assert (tmp_path / "dashboard.html").is_file()
