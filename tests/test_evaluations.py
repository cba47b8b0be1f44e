"""Evaluations as plugins: one registered inside a test, with no other file touched, reaches the record, the
report, the history and the card, through the steps called as plain functions (no Prefect)."""
import json
from pathlib import Path

import pytest

from quantgate import evaluations, gate, history
from quantgate.card import render_card
from quantgate.config import load_config
from quantgate.record import RunRecord
from quantgate.results import StepResult
from tests.conftest import PROJECT

FACTS = [("The capital of France is", " Paris", " Berlin"), ("Two plus two is", " four", " nine"),
         ("Water freezes at zero degrees", " Celsius", " bananas"), ("The opposite of hot is", " cold", " blue"),
         ("A week has seven", " days", " trees"), ("The sun rises in the", " east", " soup")]


class Preference(evaluations.Evaluation):
    """Whether the model gives the true continuation a higher log-likelihood than a wrong one, fact by fact."""
    name, label, metric, paired = "preference", "Preference", "acc", "correct"

    def run(self, lm, tokenizer, settings, manager) -> dict:
        from lm_eval.api.instance import Instance

        requests = [Instance("loglikelihood", {}, (context, option), i) for i, (context, *options) in enumerate(FACTS)
                    for option in options]
        scores = [ll for ll, _ in lm.loglikelihood(requests)]
        correct = {f"fact{i}": float(scores[2 * i] > scores[2 * i + 1]) for i in range(len(FACTS))}
        return {"acc": sum(correct.values()) / len(correct), "n": len(correct), "correct": correct}


@pytest.fixture
def only_preference(monkeypatch):
    """The throwaway evaluation registered alone (the built-in ones cost minutes of lm-eval on a CPU)."""
    monkeypatch.setattr(evaluations, "EVALUATIONS", {})
    evaluations.register(Preference())
    return evaluations.EVALUATIONS["preference"]


def run_steps(config, config_path: Path) -> RunRecord:
    """The pipeline as the flow runs it, each step a plain function of tasks/."""
    from tasks.download import download
    from tasks.evaluate import evaluate
    from tasks.quantize import quantize
    from tasks.reference import reference
    from tasks.validate import validate

    run, steps, recipe = RunRecord(config, str(config_path)), config.steps, config.recipes[0]
    fetched = download(config.model.source, None, str(config.output.cache_dir), config.model.dtype)
    run.set_model(fetched)
    ref = reference(fetched, "float32", "float32", "cpu", str(config.output.cache_dir), steps.validate, steps.evaluate)
    run.set_reference(ref)
    out = str(run.recipe_dir(recipe.name))
    quantized = quantize(fetched.checkpoint, recipe, "float32", "cpu", out, 0.5, str(config.output.cache_dir))
    assert run.set_step(recipe.name, "quantize", quantized), quantized.reason
    run.set_step(recipe.name, "validate", validate(quantized.checkpoint, recipe, ref.validate, "cpu", steps.validate))
    assert run.set_step(recipe.name, "evaluate", evaluate(quantized.checkpoint, recipe, ref.evaluate, "cpu",
                                                          steps.evaluate, out))
    run.set_step(recipe.name, "benchmark", StepResult(status="not_run", reason="not measured in this test"))
    run.finish()
    return run


def test_a_throwaway_evaluation_reaches_record_report_history_and_card(only_preference, tiny_llama, tmp_path):
    config_path = PROJECT / "configs" / "default.yaml"
    config = load_config(config_path, [
        f"model.source={tiny_llama}", "model.dtype=float32", "recipes=[torchao-int8-weight-only]",
        f"output.runs_dir={tmp_path / 'runs'}", f"output.cache_dir={tmp_path / 'cache'}",
        "steps.validate={generate_prompts: 1, max_new_tokens: 4}", "steps.evaluate={batch_size: 4}",
        "steps.publish.target=none"])
    run = run_steps(config, config_path)
    metrics = json.loads((run.dir / "metrics.json").read_text())
    mine, theirs = metrics["recipes"]["torchao-int8-weight-only"]["evaluate"]["preference"], \
        metrics["reference"]["evaluate"]["preference"]
    assert mine["n"] == theirs["n"] == len(FACTS) and "correct" not in mine  # per item: in evaluate.json only
    assert mine["paired_n"] == len(FACTS) and mine["delta_acc"] == pytest.approx(mine["acc"] - theirs["acc"])
    assert set(json.loads((run.dir / "torchao-int8-weight-only" / "evaluate.json").read_text())["preference"]
               ["correct"]) == {f"fact{i}" for i in range(len(FACTS))}
    report = (run.dir / "report.md").read_text()
    assert "| Preference (delta [95% CI]; flips) |" in report
    assert f"| {mine['acc']:.3f} ({mine['delta_acc']:+.3f} [" in report
    db = tmp_path / "history.sqlite"
    history.record_run(db, run.dir)
    cell = history.cells(db, recipe="torchao-int8-weight-only")[0]
    assert (cell["preference_value"], cell["preference_delta"]) == (mine["acc"], mine["delta_acc"])
    card = render_card(run.dir, "torchao-int8-weight-only")
    assert f"Preference: reference {theirs['acc']:.3f}, torchao-int8-weight-only {mine['acc']:.3f}" in card


def test_a_significant_drop_of_a_registered_evaluation_is_a_regression(only_preference):
    from quantgate.settings import GateSettings

    base = {"status": "passed", "nonfinite_module": None, "kl_mean": 0.1, "real_bytes": 1, "peak_memory": 1,
            "decode_ms": 1.0, "decode_spread": 0.0, "preference_delta": 0.0, "preference_significant": 0,
            "preference_low": -0.1, "preference_high": 0.1}
    worse = {**base, "preference_delta": -0.5, "preference_significant": 1, "preference_low": -0.7,
             "preference_high": -0.3}
    assert gate.regressions(worse, base, GateSettings()) == [
        "significant Preference drop: -0.5000 [-0.7000, -0.3000] (baseline +0.0000, not significant)"]
    assert gate.regressions(base, base, GateSettings()) == []


def test_a_tasks_documents_are_fingerprinted_by_their_rows_not_by_pickling_the_table():
    """datasets' own fingerprint pickles the Arrow table with dill, which failed under Python 3.12 on the GPU machine
    ("Can't pickle <class 'MonthDayNano'>"); lm-eval's caches key on the fingerprint, so equal rows must give equal
    fingerprints and different rows different ones."""
    from quantgate.evaluations.tasks.quantgate_tasks import _dataset

    one, again, other = _dataset([{"page": "a b"}]), _dataset([{"page": "a b"}]), _dataset([{"page": "a c"}])
    assert one._fingerprint == again._fingerprint != other._fingerprint
    assert one[0] == {"page": "a b"} and len(other) == 1
