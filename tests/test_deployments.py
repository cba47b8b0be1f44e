"""The deployments for real: a Prefect server on 127.0.0.1, process workers, `prefect deploy`, the
`quantize` deployment run with quick settings, and a nightly matrix of two cells shared by two workers.
Everything started here is stopped at the end. The model is the tiny Llama: what is tested is the server, the
workers and the deployments, each running the whole flow; the real models' flow is the session's (test_flow.py)."""
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from quantgate import history
from tests.conftest import PROJECT, QUICK, free_port

PREFECT = str(Path(sys.executable).parent / "prefect")
pytestmark = pytest.mark.integration  # a Prefect server, workers and deployments, though on the tiny model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_EXTRA_LOGGERS": "quantgate",
           "PYTHONUNBUFFERED": "1",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}  # a worker takes a scheduled run within 2 s, not 10
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

    def start_worker(name: str, pool: str = "quantgate", limit: int = 1):
        out = home / f"{name}.log"
        workers.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", pool, "--name", name, "--limit", str(limit)],
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
    """SIGTERM to each one's group, then 10 s for all of them together (not each: three workers waiting on their last
    poll took 30 s), then SIGKILL to whatever is left."""
    for p in processes:
        if p.poll() is None:
            os.killpg(p.pid, 15)
    deadline = time.monotonic() + 10
    for p in processes:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:  # a worker waiting on its last poll: nothing left to lose
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.killpg(p.pid, 9)
            p.wait()


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
    # Two cells, one for each worker.
    matrix = nightly_of(tmp_path, ["quanto-int8", "torchao-int8-weight-only"], quick(tmp_path, cache_dir, tiny_llama),
                        "quantize-model/quantize")
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


class Receiver:
    """A local HTTP endpoint standing in for Slack: the JSON bodies posted to it."""
    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, *words: str, timeout: float = 90) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if found := next((m["text"] for m in self.received if all(w in m["text"] for w in words)), None):
                return found
            time.sleep(1)
        raise AssertionError(f"no message with {words}; received: {self.received}")


def nightly_of(tmp_path: Path, cells: list[str], overrides: list[str], deployment: str | None) -> Path:
    matrix = tmp_path / f"nightly-{len(list(tmp_path.glob('nightly-*.yaml')))}.yaml"
    matrix.write_text(yaml.safe_dump({
        "models": [{"config": str(PROJECT / "configs" / "default.yaml"), "overrides": overrides}], "recipes": cells,
        "deployment": deployment, "history_db": str(tmp_path / "h.sqlite"),
        "dashboard": str(tmp_path / "dashboard.html")}))
    return matrix


def test_a_regressed_nightly_alerts_and_its_two_cells_on_one_worker_never_share_the_device(
        server, tiny_llama, cache_dir, tmp_path):
    """The automations of configs/automations on the server, a webhook at a local receiver; a baseline night, then
    a night whose int8 cell reads 2x the baseline's weight bytes (planted in the history): the receiver hears of the
    regression, of the failed nightly and of a nightly still going at the end of its (10 s) window. The second
    night's two cells run at once on one process worker (--limit 2) with `model.device_lock: all`: no two of their
    model steps overlap."""
    receiver = Receiver()
    installed = subprocess.run([str(Path(sys.executable).parent / "quantgate"), "alerts", "--webhook", receiver.url,
                                "--nightly-window", "10"], env=server["env"], capture_output=True, text=True, timeout=120)
    assert installed.returncode == 0 and installed.stdout.count("automation: ") == 4, installed.stdout + installed.stderr
    overrides = [*quick(tmp_path, cache_dir, tiny_llama), "model.device_lock=all"]
    night = lambda matrix: subprocess.run(  # noqa: E731
        [sys.executable, "-c", f"from flows.nightly import nightly; print(nightly({str(matrix)!r}))"],
        env=server["env"], cwd=PROJECT, capture_output=True, text=True, timeout=900)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.nightly import nightly

    with temporary_settings({PREFECT_API_URL: server["env"]["PREFECT_API_URL"]}):  # the baseline night, in this process
        nightly(str(nightly_of(tmp_path, ["torchao-int8-weight-only"], overrides, None)))
    with sqlite3.connect(tmp_path / "h.sqlite") as conn:
        conn.execute("UPDATE cells SET real_bytes = real_bytes / 2")
    server["start_worker"]("shared-gpu", limit=2)
    second = night(nightly_of(tmp_path, ["torchao-int8-weight-only", "quanto-int8"], overrides,
                              "quantize-model/quantize"))
    assert second.returncode != 0 and "RegressionError" in second.stderr
    regression = receiver.wait_for("quantgate regression:", "torchao-int8-weight-only", "weight memory")
    assert Path(tiny_llama).name in regression
    receiver.wait_for("quantgate nightly", "Failed", "torchao-int8-weight-only")
    receiver.wait_for("has not finished")

    runs = sorted((json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "runs").iterdir()
                   if (d / "metrics.json").is_file()), key=lambda m: m["started_at"])
    tonight = runs[1:]  # the first is the baseline night's
    assert len(tonight) == 2 and tonight[0]["finished_at"] > tonight[1]["started_at"]  # the two cells ran at once
    held = [(run["run_id"], *span) for run in tonight for span in device_spans(run)]
    for a, b in itertools.combinations(held, 2):
        assert a[0] == b[0] or a[2] <= b[1] or b[2] <= a[1], (a, b)


def device_spans(metrics: dict) -> list[tuple[float, float]]:
    """When a run's steps held the device: each model step's span but download and publish, a benchmark's as its load
    (from its start to when it asked for the device alone) and its time alone; between the two it holds nothing."""
    steps = [metrics["reference"]] + [v for entry in metrics["recipes"].values()
                                      for k, v in entry["steps"].items() if k not in ("publish", "benchmark")]
    spans = [interval(step) for step in steps if step.get("started_at")]
    reference = metrics["reference"].get("benchmark", {})
    benchmarks = [(reference, reference)] + [(e["steps"].get("benchmark", {}), e.get("benchmark", {}))
                                             for e in metrics["recipes"].values()]
    for step, measured in benchmarks:  # the step's span, and what it measured: a benchmark that ran was alone a while
        if step.get("started_at"):
            alone = measured["alone"]
            start, (from_, until) = interval(step)[0], interval(alone)
            spans += [(start, from_ - alone["waited_s"]), (from_, until)]
    return spans


def interval(step: dict) -> tuple[float, float]:
    start = datetime.fromisoformat(step["started_at"]).timestamp()
    return start, start + step["seconds"]


def test_steps_share_a_device_of_two_slots_and_the_benchmark_holds_it_alone(prefect_server, caplog):
    """model.device_slots: 2 - two runs' validate steps hold a slot each at once; a benchmark takes both, so it starts
    once the step before it has left, and a step arriving while it waits, with a slot free, waits behind it (the
    turnstile); a limit an operator made with one slot keeps it."""
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.devices import TURNSTILE, Devices, slots

    spans, inside = {}, {}

    def step(devices, step_name, name, seconds, meet=None):  # threads here stand for runs: their slots, not the turns
        with slots(devices, name, step_name, alone=step_name == "benchmark"):
            start = time.monotonic()
            inside.setdefault(name, threading.Event()).set()
            if meet:
                meet.wait()  # both inside at once, or the barrier breaks and the test fails
            time.sleep(seconds)
            spans[name] = (start, time.monotonic())

    def run(*calls):
        threads = [threading.Thread(target=step, args=call, daemon=True) for call in calls]
        for thread in threads:
            thread.start()
        return threads

    def joined(threads):
        for thread in threads:
            thread.join(120)
        return not any(thread.is_alive() for thread in threads)

    two = Devices((f"quantgate-test-{uuid.uuid4().hex[:8]}",), slots=2)
    together = threading.Barrier(2, timeout=60)
    assert joined(run((two, "validate", "a", 0.5, together), (two, "validate", "b", 0.5, together)))
    assert not together.broken and set(spans) == {"a", "b"}

    threads = run((two, "validate", "c", 10.0))
    inside.setdefault("c", threading.Event()).wait(60)
    threads += run((two, "benchmark", "bench", 1.0))
    with get_client(sync_client=True) as client:  # the benchmark waits, holding the turnstile, one slot still free
        deadline = time.monotonic() + 5
        while not (turnstile := client.read_global_concurrency_limit_by_name(two.names[0] + TURNSTILE).active_slots):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert turnstile == 1 and "bench" not in spans
    # Another run's step, from its own process (Prefect's client queues the requests of one process in order):
    # where no turnstile held it back, it would take the free slot at once, and the next, ahead of the benchmark.
    from prefect.settings import PREFECT_API_URL

    other = subprocess.run([sys.executable, "-c", "import time; from flows.devices import Devices, Hold\n"
                            f"with Hold(Devices(({two.names[0]!r},), 2), 'd', 'validate'):\n"
                            "    print(time.monotonic())"], cwd=PROJECT, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()})
    assert other.returncode == 0, other.stderr
    assert joined(threads) and set(spans) >= {"c", "bench"}
    assert spans["bench"][0] >= spans["c"][1] and float(other.stdout.split()[-1]) >= spans["bench"][1]

    # A benchmark's Hold: one slot while it loads, then both (and the turnstile) while it times, once the step beside it
    # has left, its own given back meanwhile; then one again.
    from flows.devices import Hold

    def active(name: str) -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    threads = run((two, "validate", "g", 1.5))
    inside.setdefault("g", threading.Event()).wait(60)
    with Hold(two, "bench2", "benchmark") as hold:
        assert active(two.names[0]) == 2
        with hold.alone():
            timed = (time.monotonic(), active(two.names[0]), active(two.names[0] + TURNSTILE))
        assert active(two.names[0]) == 1 and active(two.names[0] + TURNSTILE) == 0
    assert joined(threads) and timed[0] >= spans["g"][1] and timed[1:] == (2, 1)

    # Two benchmarks of one run loading at once, each then asking for the device alone: both time, one after the other
    # (each gives its slot back before it waits for the run's turn: kept, each would hold the slot the other waits for).
    timed = {}

    def bench(name, devices):
        with Hold(devices, name, "benchmark") as hold:
            loaded.wait(30)
            with hold.alone():
                start = time.monotonic()
                time.sleep(0.5)
                timed[name] = (start, time.monotonic(), active(devices.names[0]))

    loaded = threading.Barrier(2, timeout=30)
    pair = [threading.Thread(target=bench, args=(name, two), daemon=True) for name in ("b1", "b2")]
    for thread in pair:
        thread.start()
    assert joined(pair), "two benchmarks waiting for each other"
    (s1, e1, n1), (s2, e2, n2) = timed["b1"], timed["b2"]
    assert n1 == n2 == 2 and (e1 <= s2 or e2 <= s1)
    # A device of one slot: a step of the run, its turn taken, waiting for the slot the loading benchmark holds; the
    # benchmark gives it up, the step runs and ends, then the benchmark times.
    single = Devices((f"quantgate-test-{uuid.uuid4().hex[:8]}",), slots=1)

    def held_for(devices, seconds):
        with Hold(devices, "v", "validate"):
            start = time.monotonic()
            time.sleep(seconds)
            return start, time.monotonic()

    with Hold(single, "bench3", "benchmark") as hold:
        late = threading.Thread(target=lambda: spans.__setitem__("v", held_for(single, 0.5)), daemon=True)
        late.start()
        time.sleep(1.0)  # it has the run's turn, and waits for the slot
        with hold.alone():
            timed["b3"] = time.monotonic()
    assert joined([late]) and timed["b3"] >= spans["v"][1]

    # An operator's limit of one slot: steps one at a time, and a benchmark takes that one slot.
    one = Devices((f"quantgate-test-{uuid.uuid4().hex[:8]}",), slots=2)
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=one.names[0], limit=1))
    assert joined(run((one, "validate", "e", 1.0), (one, "validate", "f", 1.0), (one, "benchmark", "bench1", 0.1)))
    e, f = sorted((spans["e"], spans["f"]))
    assert e[1] <= f[0] and "bench1" in spans
    assert f"{one.names[0]} keeps its size, 1, where model.device_slots asks for 2 (`prefect gcl update {one.names[0]} " \
        "--limit 2` changes it)" in caplog.messages
