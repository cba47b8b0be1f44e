"""The benchmark's measurement processes forked from a zygote that imported torch and transformers once
(quantgate/bench/zygote.py), against a fresh interpreter, on the tiny Llama: the same figures where they must be
the same, failures and overruns recorded and their process gone, a new zygote for another environment, a fresh
interpreter where no zygote starts, and a zygote's children ended with it."""
import logging
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from quantgate.bench import launcher, standby, zygote
from quantgate.bench.worker import Spec
from quantgate.settings import BenchmarkSettings

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="no zygote where CUDA exists: fresh interpreters")
QUICK = BenchmarkSettings(prompt_tokens=16, new_tokens=4, repeats=1, timeout_s=300)
SLOW = QUICK.model_copy(update={"new_tokens": 4096, "repeats": 50})


def spec_of(checkpoint: Path, out: Path, settings: BenchmarkSettings = QUICK) -> Spec:
    out.mkdir(parents=True, exist_ok=True)
    return Spec(checkpoint=str(checkpoint), dtype="float32", device="cpu", settings=settings, out_dir=str(out))


def measure(checkpoint: Path, out: Path, settings: BenchmarkSettings = QUICK, fresh: bool = False) -> dict:
    return launcher.run_measurement("tiny", spec_of(checkpoint, out, settings), out / "benchmark.json", fresh)


def test_a_forked_measurement_measures_what_a_fresh_interpreter_does(tiny_llama, tmp_path):
    forked, fresh = measure(tiny_llama, tmp_path / "f"), measure(tiny_llama, tmp_path / "n", fresh=True)
    assert (forked["status"], forked["process"], fresh["status"], fresh["process"]) == ("ok", "forked", "ok", "fresh")
    for key in ("real_bytes", "real_bytes_at_load", "weight_bytes_per_token", "cpu_threads", "dtype", "device"):
        assert forked[key] == fresh[key], key
    # Both hold the same libraries before the load: the baseline within 5% (351.2 against 351.2 MB on the Xeon).
    base = [r["memory"]["host_private_baseline"] for r in (forked, fresh)]
    assert abs(base[0] - base[1]) <= 0.05 * base[1], base
    # What each printed is in its log beside its result, the step's lines among it.
    for folder in ("f", "n"):
        assert "benchmark: batch 1, repeat 1/1" in (tmp_path / folder / "benchmark-log.txt").read_text()
    # Where a process's start went is in both records; the forked one did no imports of its own.
    for result in (forked, fresh):
        assert min(result["process_up_s"], result["prepare_s"], result["first_forward_s"]) >= 0, result
    assert forked["process_up_s"] < fresh["process_up_s"]


def test_a_measurement_that_fails_or_overruns_is_recorded_and_its_process_gone(tiny_llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = measure(empty, tmp_path / "a")
    assert failed["status"] == "error" and failed["process"] == "forked"
    assert failed["reason"].startswith("the benchmark process failed (exit code 1): ")
    assert "ValueError: Unrecognized model in " + str(empty) in failed["reason"]  # the exception, from its log
    overran = measure(tiny_llama, tmp_path / "b", SLOW.model_copy(update={"timeout_s": 3}))
    assert overran == {"status": "error", "reason": "the benchmark process ran past 3 s", "process": "forked"}
    assert launcher._zygote["running"].proc.poll() is None  # the zygote lives on; its child does not
    assert psutil.Process(launcher._zygote["running"].proc.pid).children() == []
    # Its own log is read through an open handle, its file already unlinked: nothing left however the run ends.
    log = launcher._zygote["running"].log
    assert not Path(log.name).exists() and zygote.tail(log) != "unreadable"


def test_another_environment_gets_a_zygote_of_its_own_and_its_threads(tiny_llama, tmp_path, monkeypatch):
    """The zygote imports on one thread (a thread pool would not survive the fork); a measurement then runs as many
    as OMP_NUM_THREADS asks, as a fresh interpreter would. Another environment: another zygote."""
    env = launcher.measurement_env(spec_of(tiny_llama, tmp_path))
    before = launcher.lease_zygote(env)
    launcher.release(before)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")  # not read by the zygote's imports: the same zygote
    assert launcher.lease_zygote(launcher.measurement_env(spec_of(tiny_llama, tmp_path))) is before
    launcher.release(before)
    threads = "2" if env.get("OMP_NUM_THREADS") != "2" else "1"
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setenv("MKL_NUM_THREADS", threads)  # torch reads it over OMP_NUM_THREADS
    found = measure(tiny_llama, tmp_path / "b")
    assert found["process"] == "forked" and found["cpu_threads"] == int(threads)
    assert launcher._zygote["running"] is not before and before.proc.poll() is not None  # the old one closed


def test_where_no_zygote_starts_a_fresh_interpreter_measures(tiny_llama, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="quantgate.benchmark")
    monkeypatch.setitem(launcher._zygote, "running", None)  # the worker's own zygote comes back after the test
    monkeypatch.setitem(launcher._zygote, "failed_in", None)
    monkeypatch.setattr(zygote.Zygote, "COMMAND", [zygote.sys.executable, "-c", "print('no torch here'); exit(3)"])
    found = measure(tiny_llama, tmp_path)
    assert found["status"] == "ok" and found["process"] == "fresh"
    assert "fresh interpreters for this environment: no zygote" in caplog.text and "no torch here" in caplog.text
    assert launcher.lease_zygote(launcher.measurement_env(spec_of(tiny_llama, tmp_path))) is None  # not tried again


def test_a_zygote_stopped_by_sigterm_ends_its_measurements(tiny_llama, tmp_path):
    """What `quantgate run` does on SIGTERM (runlog.stop_children) and its watchdog on SIGKILL: the zygote goes, and
    the measurements it forked go with it."""
    spec = spec_of(tiny_llama, tmp_path, SLOW)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    z = zygote.Zygote(launcher.measurement_env(spec), tmp_path / "zygote.log")
    child = z.start([str(tmp_path / "spec.json"), str(tmp_path / "out.json")], tmp_path / "log.txt", tmp_path,
                    launcher.measurement_env(spec))
    time.sleep(1)
    assert psutil.Process(child.pid).ppid() == z.proc.pid
    measured = psutil.Process(child.pid)
    os.kill(z.proc.pid, signal.SIGTERM)
    assert z.proc.wait(timeout=30) == 0
    measured.wait(timeout=30)  # gone, whoever reaped it (the zygote before it exited)
    assert not measured.is_running()
    z.close()


@pytest.fixture
def standing_by(monkeypatch):
    """Measurements start in standbys, as on a host with CUDA (no zygote forks there); the standbys the test's own."""
    monkeypatch.setattr(launcher, "stands_by", lambda: True)
    monkeypatch.setattr(launcher, "lease_zygote", lambda env: None)
    monkeypatch.setitem(launcher._standby, "ready", [])
    yield
    for unused in launcher._standby["ready"]:
        unused.close()


def test_a_measurement_in_a_standby_measures_what_a_fresh_interpreter_does(tiny_llama, tmp_path, standing_by,
                                                                            monkeypatch):
    launcher.prepare_standby()  # as a run does at its start
    first = launcher._standby["ready"][0]
    assert first.wait_ready()["ready"]  # as by the first benchmark of a run
    found = measure(tiny_llama, tmp_path / "s")
    assert found["status"] == "ok" and found["process"] == "standby", found.get("reason")
    assert "was asked for (a standby" in (tmp_path / "s" / "benchmark-log.txt").read_text()
    assert first.proc.poll() == 0  # it measured, then ended as an interpreter ends
    following = launcher._standby["ready"]  # one started in its place, for the next measurements
    assert len(following) == launcher.STANDBYS and first not in following
    assert all(s.proc.poll() is None for s in following)
    monkeypatch.setattr(launcher, "stands_by", lambda: False)
    fresh = measure(tiny_llama, tmp_path / "n", fresh=True)
    assert fresh["process"] == "fresh"
    for key in ("real_bytes", "real_bytes_at_load", "weight_bytes_per_token", "cpu_threads", "dtype", "device"):
        assert found[key] == fresh[key], key
    # Its imports were done before it was asked for; a fresh interpreter's are not.
    assert found["process_up_s"] < fresh["process_up_s"]


def test_the_next_standby_waits_while_a_measurement_times(standing_by):
    def reaches(proc, wanted: set[str]) -> str:
        deadline = time.monotonic() + 10
        while (now := psutil.Process(proc.pid).status()) not in wanted and time.monotonic() < deadline:
            time.sleep(0.05)
        return now

    with launcher.timing():
        launcher.prepare_standby()
        standbys = list(launcher._standby["ready"])
        # Their imports would share the host with the timing.
        states = [reaches(s.proc, {psutil.STATUS_STOPPED}) for s in standbys]
        assert states == [psutil.STATUS_STOPPED] * launcher.STANDBYS
    for standby in standbys:
        assert reaches(standby.proc, {psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING}) != psutil.STATUS_STOPPED
        standby.close()
        # Closed unused, it ends at once: as it asked (0), or, before it could ask, as SIGTERM ends a process.
        assert standby.proc.returncode in (0, -signal.SIGTERM)
    launcher._standby["ready"].clear()


def test_a_standby_for_another_environment_or_one_that_fails_leaves_a_fresh_interpreter_to_measure(
        tiny_llama, tmp_path, standing_by, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="quantgate.benchmark")
    launcher.prepare_standby()
    before = list(launcher._standby["ready"])
    monkeypatch.setenv("OMP_NUM_THREADS", "1" if os.environ.get("OMP_NUM_THREADS") != "1" else "2")  # read at import
    assert measure(tiny_llama, tmp_path / "a")["process"] == "fresh"
    assert all(s.proc.poll() is not None for s in before)  # closed unused, and the run's log says why
    assert "instead of the standby: started with other import-time variables: OMP_NUM_THREADS" in caplog.text
    now = launcher._standby["ready"]  # the next ones, in the new environment
    assert len(now) == launcher.STANDBYS and all(s.serves(launcher.measurement_env()) for s in now)
    for unused in now:
        unused.close()
    now.clear()
    monkeypatch.setattr(standby.Standby, "COMMAND", [zygote.sys.executable, "-c", "print('no torch here'); exit(3)"])
    launcher.prepare_standby()
    found = measure(tiny_llama, tmp_path / "b")
    assert found["status"] == "ok" and found["process"] == "fresh"
    # Asked for while it still ran, or found ended: either way the log says why, with what it printed.
    assert ("a fresh interpreter instead: the standby is not ready" in caplog.text
            or "instead of the standby: it ended (exit code 3)" in caplog.text) and "no torch here" in caplog.text


def test_two_measurements_started_at_once_each_find_a_standby_ready(standing_by):
    """A benchmark step starts its measurement and the quantize-on-load beside it together: both find their imports
    done, and the pool is filled again behind them."""
    launcher.prepare_standby()
    assert all(s.wait_ready()["ready"] for s in launcher._standby["ready"])
    env, together, taken = launcher.measurement_env(), threading.Barrier(2), []

    def take() -> None:
        together.wait()
        taken.append(launcher.take_standby(env))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert None not in taken and taken[0] is not taken[1]
    assert all(s.wait_ready()["ready"] and s.proc.poll() is None for s in taken)
    assert len(launcher._standby["ready"]) == launcher.STANDBYS and not set(taken) & set(launcher._standby["ready"])
    for unused in taken:
        unused.close()
