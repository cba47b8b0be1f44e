"""The benchmark's measurement processes forked from a zygote that imported torch and transformers once
(quantgate/bench/zygote.py), against a fresh interpreter, on the tiny Llama: the same figures where they must be
the same, failures and overruns recorded and their process gone, and a new zygote for another environment."""
from pathlib import Path

import psutil

from quantgate.bench import launcher
from quantgate.bench.worker import Spec
from quantgate.settings import BenchmarkSettings

QUICK = BenchmarkSettings(prompt_tokens=16, new_tokens=4, repeats=1, timeout_s=300)


def spec_of(checkpoint: Path, out: Path, settings: BenchmarkSettings = QUICK) -> Spec:
    out.mkdir(parents=True, exist_ok=True)
    return Spec(checkpoint=str(checkpoint), dtype="float32", device="cpu", settings=settings, out_dir=str(out))


def zygote_children() -> list[psutil.Process]:
    zygote = launcher._zygote["running"]
    return psutil.Process(zygote.proc.pid).children() if zygote and zygote.proc.poll() is None else []


def test_a_forked_measurement_measures_what_a_fresh_interpreter_does(tiny_llama, tmp_path, monkeypatch):
    forked = launcher.run_measurement("tiny", spec_of(tiny_llama, tmp_path / "f"), tmp_path / "f" / "benchmark.json")
    with monkeypatch.context() as m:
        m.setattr(launcher, "zygote_for", lambda env: None)
        fresh = launcher.run_measurement("tiny", spec_of(tiny_llama, tmp_path / "n"), tmp_path / "n" / "benchmark.json")
    assert (forked["status"], forked["process"], fresh["status"], fresh["process"]) == ("ok", "forked", "ok", "fresh")
    for key in ("real_bytes", "real_bytes_at_load", "weight_bytes_per_token", "cpu_threads", "dtype", "device"):
        assert forked[key] == fresh[key], key
    # Both hold the same libraries before the load: the baseline within 5% (351.2 against 351.2 MB on the Xeon).
    base = [r["memory"]["host_private_baseline"] for r in (forked, fresh)]
    assert abs(base[0] - base[1]) <= 0.05 * base[1], base
    # What the process printed is in its log beside the result, the step's lines among it.
    assert "benchmark: batch 1, repeat 1/1" in (tmp_path / "f" / "benchmark-log.txt").read_text()
    assert zygote_children() == []


def test_a_measurement_that_fails_or_overruns_is_recorded_and_its_process_gone(tiny_llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    failed = launcher.run_measurement("none", spec_of(empty, tmp_path / "a"), tmp_path / "a" / "benchmark.json")
    assert failed["status"] == "error" and failed["reason"].startswith("the benchmark process failed (exit code 1): ")
    assert "ValueError: Unrecognized model in " + str(empty) in failed["reason"]  # the exception, from its log
    slow = QUICK.model_copy(update={"new_tokens": 4096, "repeats": 50, "timeout_s": 3})
    overran = launcher.run_measurement("slow", spec_of(tiny_llama, tmp_path / "b", slow), tmp_path / "b" / "benchmark.json")
    assert overran == {"status": "error", "reason": "the benchmark process ran past 3 s"}
    assert zygote_children() == []  # killed and reaped


def test_another_environment_gets_a_zygote_of_its_own_and_its_threads(tiny_llama, tmp_path, monkeypatch):
    """The zygote imports on one thread (a thread pool would not survive the fork); a measurement then runs as many
    as OMP_NUM_THREADS asks, as a fresh interpreter would. Another environment: another zygote."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    first = launcher.run_measurement("tiny", spec_of(tiny_llama, tmp_path / "a"), tmp_path / "a" / "benchmark.json")
    zygote = launcher._zygote["running"]
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    second = launcher.run_measurement("tiny", spec_of(tiny_llama, tmp_path / "b"), tmp_path / "b" / "benchmark.json")
    assert first["process"] == second["process"] == "forked"
    assert (first["cpu_threads"], second["cpu_threads"]) == (1, 2)
    assert launcher._zygote["running"] is not zygote and zygote.proc.poll() is not None  # the old one closed
