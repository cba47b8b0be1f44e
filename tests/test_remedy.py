"""Attribution and remedy (quantgate.attribution, tasks/remedy.py, `quantgate remedy`) on a run record made here from
the tiny Llama: its torchao int8 checkpoint, the reference's cached validation, and thresholds that int8 misses."""
import json
from pathlib import Path

import pytest
import torch

from quantgate import attribution, cli, drift, modeling
from quantgate.config import dump_config, load_config
from quantgate.results import ReferenceValidation
from quantgate.settings import ValidateSettings
from tasks import quantize as quantize_step
from tasks import validate as validate_step
from tests.conftest import PROJECT


PLANTED = "model.layers.1.mlp.down_proj"


def damage(checkpoint: Path) -> None:
    """PLANTED's stored per-row scales eight times what they should be (its output eight times too large), the
    file's torchao metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = checkpoint / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    weights = load_file(path)
    weights[PLANTED + "._weight_scale"] *= 8
    save_file(weights, path, metadata=metadata)


@pytest.fixture
def run_record(tiny_llama, tmp_path):
    """A finished run's folder as the flow leaves it, for one recipe whose checkpoint has one damaged module and whose
    drift is three times its warn threshold."""
    from transformers import AutoTokenizer

    config = load_config(PROJECT / "configs" / "default.yaml", [
        f"model.source={tiny_llama}", "model.dtype=float32", f"output.cache_dir={tmp_path / 'cache'}",
        "recipes=[{use: torchao-int8-weight-only, name: int8-tight}]"])
    recipe = config.recipes[0]
    run = tmp_path / "run"
    quantized = quantize_step.quantize(str(tiny_llama), recipe, "float32", "cpu", str(run / recipe.name), 0.0)
    damage(Path(quantized.checkpoint))
    reference = drift.reference_stats(modeling.load(tiny_llama, "float32", "cpu"), AutoTokenizer.from_pretrained(tiny_llama),
                                      "tiny", "float32", tmp_path / "cache", ValidateSettings())
    measured = validate_step.validate(quantized.checkpoint, recipe, ReferenceValidation(**reference), "cpu",
                                      ValidateSettings(), "float32").model_dump()
    tight = recipe.thresholds.model_copy(update={"kl_mean_warn": measured["kl_mean"] / 3, "kl_p99_warn": 100.0,
                                                  "top1_warn": 0.0})
    config = config.model_copy(update={"recipes": [recipe.model_copy(update={"thresholds": tight})]})
    (run / "config.yaml").write_text(dump_config(config))
    metrics = {"model": {"checkpoint": str(tiny_llama)},
               "reference": {"validate": reference, "compute_dtype": "float32",
                             "real_bytes": modeling.real_bytes(modeling.load(tiny_llama, "float32", "cpu"))},
               "recipes": {recipe.name: {"quantize": quantized.record(), "validate": measured}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
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
    recipe = load_config(run / "int8-tight" / "remedy.yaml").recipes[0]
    assert recipe.name == "int8-tight-remedy" and recipe.skip == kept
    checked = found["check"]["validate"]
    assert checked["verdict"] == "pass" and checked["kl_mean"] <= kl / 3
    assert checked["kl_mean"] == pytest.approx(best["kl_mean"], rel=1e-3)  # kept in memory as the skip leaves it
    plan = json.loads((run / "int8-tight" / "remedy" / "plan.json").read_text())
    assert sorted(e["module"] for e in plan["modules"] if e["status"] == "skipped" and e["module"] in kept) == sorted(kept)
    assert "int8-tight-remedy: pass" in capsys.readouterr().out


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
