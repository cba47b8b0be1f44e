"""Placing a model over the GPUs of one host, decided on a CPU: model.device and model.max_memory as the steps
load with them, the device map accelerate makes from the limits, the record's per-device fields, and the
nightly matrix's multi-GPU cells."""
import json
import re
from collections import Counter

import pytest
import torch

from quantgate import modeling
from quantgate.config import ConfigError, load_config
from quantgate.paths import PROJECT_ROOT

DEFAULT = PROJECT_ROOT / "configs" / "default.yaml"


def test_device_and_limits_become_a_placement():
    assert modeling.placement("cpu", gpus=2) == "cpu"
    assert modeling.placement("auto", gpus=0) == "cpu"
    assert modeling.placement("auto", gpus=1) == "cuda"  # one GPU: as before
    assert modeling.placement([1], gpus=2) == "cuda:1"
    assert modeling.placement("auto", {0: "40GiB", 1: "40GiB"}, gpus=2) == {
        "device_map": "auto", "max_memory": {0: "40GiB", 1: "40GiB"}}
    assert modeling.placement([0, 1], {0: "20GiB", 1: "30GiB", "cpu": "100GiB"}, gpus=4) == {
        "device_map": "auto", "max_memory": {0: "20GiB", 1: "30GiB", "cpu": "100GiB"}}


@pytest.mark.parametrize("device, limits, gpus, message", [
    ("cuda", None, 0, "has no CUDA device"),
    ([0, 2], None, 2, "this machine has 2 (no GPU 2)"),
    ([0, 1], {0: "1GiB", 3: "1GiB"}, 4, "limits GPU 3, which model.device [0, 1] does not use"),
])
def test_placements_that_cannot_be_are_refused(device, limits, gpus, message):
    with pytest.raises(RuntimeError, match=re.escape(message)):
        modeling.placement(device, limits, gpus=gpus)


def test_a_placement_survives_json_to_the_benchmark_process():
    placed = modeling.placement("auto", {0: "40GiB", 1: "40GiB"}, gpus=2)
    assert modeling.resolve_device(json.loads(json.dumps(placed))) == placed


def test_the_config_takes_a_gpu_list_and_checks_its_limits():
    config = load_config(DEFAULT, ["model.device=[0, 1]", "model.max_memory={0: 40GiB, 1: 40GiB}"])
    assert config.model.device == [0, 1] and config.model.max_memory == {0: "40GiB", 1: "40GiB"}
    with pytest.raises(ConfigError, match="model.max_memory.0"):
        load_config(DEFAULT, ["model.max_memory={0: forty gigs}"])


def test_the_plan_places_the_model_from_its_limits(smollm2, cache_dir):
    from quantgate.plan import make_plans, planned_placement

    overrides = [f"model.source={smollm2}", f"output.cache_dir={cache_dir}", "recipes=[bnb-nf4]"]
    from transformers import AutoConfig

    skeleton = modeling.skeleton(AutoConfig.from_pretrained(smollm2))
    # SmolLM2's 0.27 GB in bf16 over two 150 MB GPUs: both used, nothing left over.
    counts = planned_placement(skeleton, load_config(DEFAULT, [*overrides, "model.max_memory={0: 150MB, 1: 150MB}"]))
    assert set(counts) == {"0", "1"} and sum(counts.values()) == 34  # embed, head, 30 layers, norm, rotary
    too_small = load_config(DEFAULT, [*overrides, "model.max_memory={0: 50MB, 1: 50MB}"])
    with pytest.raises(ConfigError, match="model.max_memory: the bfloat16 model does not fit .* would go to disk"):
        make_plans(too_small, DEFAULT)
    with_cpu = load_config(DEFAULT, [*overrides, "model.max_memory={0: 50MB, 1: 50MB, cpu: 1GB}"])
    assert "cpu" in planned_placement(skeleton, with_cpu)  # offloading was asked for


def test_the_record_says_where_the_weights_are(tiny_llama):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    on_cpu = modeling.devices_of(model)
    assert set(on_cpu["param_bytes_by_device"]) == {"cpu"} and not on_cpu["hf_device_map_present"]
    with init_empty_weights():
        model.model.layers[1] = type(model.model.layers[1])(AutoConfig.from_pretrained(tiny_llama), 1)
    model.hf_device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "disk", "lm_head": 0}
    split = modeling.devices_of(model)
    assert split["param_bytes_by_device"]["offloaded"] > 0 and split["modules_by_device"] == {"0": 3, "disk": 1}


def test_multi_gpu_cells_go_to_their_own_queue(tmp_path):
    from flows.nightly import queue
    from quantgate.config import load_nightly

    matrix = tmp_path / "nightly.yaml"
    matrix.write_text(f"models: [{{config: {DEFAULT}}}, {{config: {DEFAULT}, gpus: 2}}]\nrecipes: [bnb-nf4]\n")
    assert [queue(m.gpus) for m in load_nightly(matrix).models] == ["default", "gpus-2"]


def test_the_planned_map_is_the_one_transformers_made_on_two_h200s():
    """docs/BENCHMARKS.md (issue 21): the Gemma-3-12B-shaped checkpoint under {0: 14GiB, 1: 14GiB} was placed
    by from_pretrained(device_map="auto") with 28 modules on GPU 0 and 24 on GPU 1; the plan, made on a CPU
    from the config alone, must say the same."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                              query_pre_attn_scalar=256, max_position_embeddings=4096, architectures=["Gemma3ForCausalLM"])
    planned = modeling.planned_device_map(modeling.skeleton(config), {0: "14GiB", 1: "14GiB"}, torch.bfloat16)
    measured = json.loads((PROJECT_ROOT / "docs/gpu/output/multigpu-g3-h200x2.jsonl").read_text().splitlines()[2])
    assert measured["step"] == "reference load"
    assert {str(d): n for d, n in Counter(planned.values()).items()} \
        == measured["devices"]["modules_by_device"] == {"0": 28, "1": 24}
