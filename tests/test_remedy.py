"""Attribution and remedy (quantgate.attribution, tasks/remedy.py, `quantgate remedy`) on a run record made here from
the tiny Llama: its torchao int8 checkpoint, the reference's cached validation, and thresholds that int8 misses."""
import json
from pathlib import Path

import pytest
import torch

from quantgate import attribution, cli, drift, modeling
from quantgate.config import dump_config, load_config
from quantgate.results import ReferenceValidation
from tasks import quantize as quantize_step
from tasks import validate as validate_step
from tests.conftest import PROJECT, edit_weights


PLANTED = "model.layers.1.mlp.down_proj"


def damage(weights):
    """PLANTED's stored per-row scales eight times what they should be: its output eight times too large."""
    weights[PLANTED + "._weight_scale"] *= 8


def make_run(base: Path, recipe_text: str, folder: Path, dtype: str = "float32", damage=None, thresholds=None,
             reference: dict | None = None, overrides: tuple = ()):
    """A finished run's folder as the flow leaves it for one recipe (config.yaml, metrics.json, the checkpoint and
    the reference's cached validation, measured here unless given), its checkpoint damaged by `damage`;
    `thresholds(measured)`, the recipe's."""
    from transformers import AutoTokenizer

    config = load_config(PROJECT / "configs" / "default.yaml", [
        f"model.source={base}", f"model.dtype={dtype}", f"output.cache_dir={folder / 'cache'}", f"recipes=[{recipe_text}]",
        *overrides])
    recipe, run, computes = config.recipes[0], folder / "run", modeling.compute_dtype(dtype, "cpu")
    quantized = quantize_step.quantize(str(base), recipe, dtype, "cpu", str(run / recipe.name), 0.0)
    if damage:
        edit_weights(Path(quantized.checkpoint), damage)
    settings = config.steps.validate
    reference = reference or drift.reference_stats(modeling.load(base, computes, "cpu"),
                                                   AutoTokenizer.from_pretrained(base), base.name, dtype,
                                                   folder / "cache", settings)
    measured = validate_step.validate(quantized.checkpoint, recipe, ReferenceValidation(**reference), "cpu",
                                      settings, computes).model_dump()
    if thresholds:
        config = config.model_copy(update={"recipes": [recipe.model_copy(update={"thresholds": thresholds(measured)})]})
    (run / "config.yaml").write_text(dump_config(config))
    metrics = {"model": {"checkpoint": str(base)},
               "reference": {"validate": reference, "compute_dtype": computes,
                             "real_bytes": modeling.real_bytes(modeling.load(base, dtype, "cpu"))},
               "recipes": {recipe.name: {"quantize": quantized.record(), "validate": measured}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run, measured


@pytest.fixture
def run_record(tiny_llama, tmp_path):
    """torchao int8 of the tiny Llama with one damaged module, its warn threshold a third of the KL it measured."""
    def tight(measured):
        return load_config(PROJECT / "configs" / "default.yaml", ["recipes=[torchao-int8-weight-only]"]).recipes[0] \
            .thresholds.model_copy(update={"kl_mean_warn": measured["kl_mean"] / 3, "kl_p99_warn": 100.0, "top1_warn": 0.0})

    run, measured = make_run(tiny_llama, "{use: torchao-int8-weight-only, name: int8-tight}", tmp_path, damage=damage,
                             thresholds=tight)
    return run, measured["kl_mean"]


def test_remedy_keeps_the_modules_that_matter_and_its_recipe_passes_for_real(run_record, capsys):
    run, kl = run_record
    assert cli.main(["remedy", str(run), "int8-tight", "--top", "3", "--budget", "1.0"]) == 0
    found = json.loads((run / "int8-tight" / "remedy.json").read_text())
    ranked = found["attribution"]["modules"]
    assert found["attribution"]["quantized_modules"] == 14 and len(ranked) == 3  # 7 Linear a layer, 2 layers
    assert found["attribution"]["drift"]["kl_mean"] == pytest.approx(kl, rel=1e-4)  # what validate measured
    assert ranked[0]["local_error"] >= ranked[1]["local_error"] >= ranked[2]["local_error"] > 0
    assert ranked[0]["module"] == PLANTED and ranked[0]["kl_recovered"] > 0.5 * kl  # the planted module, confirmed
    assert all(r["bytes_added"] > 0 for r in ranked)
    tried, kept = found["search"]["tried"], found["search"]["kept"]
    assert kept[0] == PLANTED
    best = min((t for t in tried if t["verdict"] == "pass"), key=lambda t: t["kept"])
    assert best["kept"] == len(kept) and all(t["verdict"] != "pass" for t in tried if t["kept"] < len(kept))
    assert [v["change"] for v in found["variants"]] == [f"keep {len(kept)} module" + "s" * (len(kept) > 1)]  # int8 has no finer variant
    recipe = load_config(run / "int8-tight" / "remedy.yaml").recipes[0]
    assert recipe.name == "int8-tight-remedy" and recipe.skip == kept
    assert found["gated"]["chosen"] == 1 and found["recipe"] == recipe.model_dump(mode="json")
    checked = found["gated"]["tried"][0]
    assert checked["verdict"] == "pass" and checked["kl_mean"] <= kl / 3
    assert checked["kl_mean"] == pytest.approx(best["kl_mean"], rel=1e-3)  # kept in memory as the skip leaves it
    plan = json.loads((run / "int8-tight" / "remedy" / "1" / "plan.json").read_text())
    assert sorted(e["module"] for e in plan["modules"] if e["status"] == "skipped" and e["module"] in kept) == sorted(kept)
    assert f"recipe that passes: {run / 'int8-tight' / 'remedy.yaml'}" in capsys.readouterr().out


def test_a_recipe_the_run_does_not_hold_is_refused_naming_the_allowed(run_record, capsys):
    run, _ = run_record
    assert cli.main(["remedy", str(run), "nf4"]) == 2
    assert f"{run / 'config.yaml'}: recipes: 'nf4' is not in this run; allowed: int8-tight" in capsys.readouterr().err


def test_restoring_a_module_is_undone(tiny_llama):
    from transformers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    reference = modeling.load(tiny_llama, "float32", "cpu")
    quantized = modeling.load(tiny_llama, "float32", "cpu", TorchAoConfig(Int8WeightOnlyConfig()))
    name = "model.layers.0.mlp.down_proj"
    before = quantized.get_submodule(name)
    with attribution.restored(quantized, reference, [name]):
        assert not modeling.is_quantized(quantized.get_submodule(name))
        assert torch.equal(quantized.get_submodule(name).weight, reference.get_submodule(name).weight)
    assert quantized.get_submodule(name) is before


def test_the_remedy_flow_of_the_deployment_writes_the_recipe_that_passes(run_record, prefect_server):
    """`remedy/remedy` runs flows/remedy.py:remedy_run: the same attribution and variants through the quantize and
    validate tasks, its record beside the run's."""
    from flows.remedy import remedy_run

    run, kl = run_record
    assert remedy_run(str(run), "int8-tight", top=2, budget=1.0) == str(run / "int8-tight" / "remedy.yaml")
    found = json.loads((run / "int8-tight" / "remedy.json").read_text())
    assert found["status"] == "ok" and found["attribution"]["modules"][0]["module"] == PLANTED
    assert found["gated"]["tried"][-1]["verdict"] == "pass" and found["gated"]["tried"][-1]["kl_mean"] <= kl / 3
    assert load_config(run / "int8-tight" / "remedy.yaml").recipes[0].skip == found["search"]["kept"]
