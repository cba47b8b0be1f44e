"""Quantize step on the real SmolLM2: every CPU recipe quantizes, saves and loads back."""
import importlib.util
import json
from types import SimpleNamespace

import pytest
import torch

from quantgate import modeling
from quantgate.backends import backend_of
from quantgate.config import available_recipes, load_config
from quantgate.plan import checkpoint_bytes, plan_recipe, reconcile, summarize
from tasks import quantize as step
from tests.conftest import PROJECT

RECIPES = {name: load_config(PROJECT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]
           for name in available_recipes() if name != "checkpoint"}  # a candidate needs its source
# GPTQ calibrates for minutes on a CPU with its 32 windows of 256 tokens: 4 of 64 here.
RECIPES["gptq-w4g64"] = RECIPES["gptq-w4g64"].model_copy(update={"calibration_samples": 4, "calibration_tokens": 64})
# 128x128 FP8 blocks do not divide SmolLM2's 576-wide layers (tests/test_fp8.py runs them on a model they fit).
CPU_RECIPES = [name for name, recipe in RECIPES.items()
               if not backend_of(recipe).needs_cuda(recipe) and name != "fp8-block128"]
CUDA_RECIPES = [name for name in RECIPES if name not in CPU_RECIPES and name != "fp8-block128"]


@pytest.fixture(scope="module")
def reference_bytes(smollm2):
    return step.modeling.real_bytes(modeling.load(smollm2, "bfloat16", "cpu"))


def run_recipe(smollm2, tmp_path, name, **kw):
    return step.quantize(str(smollm2), RECIPES[name], "bfloat16", kw.get("device", "cpu"),
                         str(tmp_path / name), roundtrip_min_top1=kw.get("min_top1", 0.9)).model_dump()


@pytest.mark.parametrize("name", CPU_RECIPES)
def test_cpu_recipe_quantizes_and_round_trips(smollm2, tmp_path, reference_bytes, name):
    result = run_recipe(smollm2, tmp_path, name)
    assert result["status"] == "ok", result.get("reason")
    assert result["quantized_modules"] == 210 and result["skipped_modules"] == 1  # lm_head (tied embedding)
    ratio = result["real_bytes_at_load"] / reference_bytes
    # The tied embedding (28 M of SmolLM2's 135 M parameters) stays bf16: 8-bit recipes keep 60-65%.
    assert ratio < (0.45 if name in ("bnb-nf4", "quanto-int4", "hqq-int4", "gptq-w4g64") else 0.70), ratio
    if name == "gptq-w4g64":  # compressed-tensors expands int4 to bf16 on the first forward in transformers
        assert result["real_bytes"] > 0.95 * reference_bytes
        assert "once it has run a forward" in result["warnings"][0]
    else:
        assert result["real_bytes"] == result["real_bytes_at_load"]
    rt = result["roundtrip"]
    assert rt["finite"] and rt["tokens"] > 50 and rt["top1_agreement"] >= 0.9
    # The disk check's estimate, from the plan and the backend's bits per weight, against what was written.
    assert abs(result["checkpoint_bytes"] / result["checkpoint_bytes_estimated"] - 1) < 0.02, result
    weights = "qmodel.pt" if name == "hqq-int4" else "model.safetensors"  # hqq's own format
    assert (tmp_path / name / "checkpoint" / weights).is_file()
    plan = json.loads((tmp_path / name / "plan.json").read_text())
    assert plan["summary"] == {"quantized": 210, "skipped": 1, "fallback": 0}
    assert plan["modules"][-1] == {"module": "lm_head", "shape": [49152, 576], "status": "skipped",
                                   "reason": "output embedding (kept in high precision by default)"}


def test_a_checkpoint_the_disk_cannot_hold_stops_before_the_load(smollm2, tmp_path, monkeypatch):
    free = 50_000_000  # SmolLM2 in nf4 takes about 115 MB
    monkeypatch.setattr(step.shutil, "disk_usage", lambda path: SimpleNamespace(free=free))
    monkeypatch.setattr(step, "load_quantized", lambda *a, **k: pytest.fail("loaded although the disk is full"))
    result = run_recipe(smollm2, tmp_path, "bnb-nf4")
    assert result["status"] == "error" and 1.1e8 < result["checkpoint_bytes_estimated"] < 1.2e8
    assert result["reason"] == (f"not enough disk for the checkpoint: about 0.11 GB by the plan, 10% more to spare, and "
                                f"0.05 GB free in {tmp_path / 'bnb-nf4'}; free some, or set output.runs_dir on a larger disk")
    assert not (tmp_path / "bnb-nf4" / "checkpoint").exists()


# Gemma 3 12B's text shapes, as docs/gpu/quantize_on_gpu.py builds the checkpoint the H100 flow ran on.
G3_12B = dict(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
              num_key_value_heads=8, head_dim=256, sliding_window=1024, query_pre_attn_scalar=256)


def test_the_disk_estimate_holds_for_the_checkpoints_published_on_the_h100():
    from transformers import Gemma3TextConfig

    record = json.loads((PROJECT / "docs/gpu/output/flow-g3-h100-defaults/metrics.json").read_text())
    config = Gemma3TextConfig(**G3_12B)
    config.architectures = ["Gemma3ForCausalLM"]
    skeleton = modeling.skeleton(config)
    for name, entry in record["recipes"].items():
        recipe = load_config(PROJECT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]
        estimate = checkpoint_bytes(skeleton, plan_recipe(skeleton, recipe), "bfloat16",
                                    backend_of(recipe).stored_bits(recipe))
        # torchao's int4 pads its tiles, 3% over the estimate: the check keeps 10% to spare.
        assert estimate < entry["publish"]["bytes"] < estimate * step.DISK_SPARE, (name, estimate)


def test_real_bytes_count_the_inner_tensors(smollm2, reference_bytes):
    from transformers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    assert reference_bytes == 269030272  # 134.5 M bf16 parameters, the tied embedding once
    model = modeling.load(smollm2, "bfloat16", "cpu", TorchAoConfig(Int8WeightOnlyConfig()))
    # transformers counts a torchao tensor at its logical dtype; its int8 data is what it holds.
    assert model.get_memory_footprint() == reference_bytes
    assert modeling.real_bytes(model) < 0.65 * reference_bytes


@pytest.mark.parametrize("name", ["torchao-int4-weight-only"])
def test_cuda_recipe_says_so_on_cpu(smollm2, tmp_path, name):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_recipe(smollm2, tmp_path, name)
    assert result["status"] == "skipped" and result["reason"].startswith("needs CUDA (")
    assert not (tmp_path / name).exists()


def test_broken_round_trip_fails_the_step(smollm2, tmp_path, monkeypatch):
    real = step.load_saved

    def damaged(path, recipe, device):
        model = real(path, recipe, device)
        with torch.no_grad():
            model.model.norm.weight.mul_(-3)  # a checkpoint that loads but does not match
        return model

    monkeypatch.setattr(step, "load_saved", damaged)
    result = run_recipe(smollm2, tmp_path, "bnb-int8")
    assert result["status"] == "failed"
    assert result["reason"].startswith("the reloaded checkpoint disagrees with the in-memory model: top-1 agreement")
    assert result["roundtrip"]["top1_agreement"] < 0.9


def test_fallback_is_planned_then_checked_against_the_model(smollm2):
    from transformers import AutoConfig

    skeleton = modeling.skeleton(AutoConfig.from_pretrained(smollm2))
    plan = plan_recipe(skeleton, RECIPES["torchao-int4-weight-only"])
    assert summarize(plan) == {"quantized": 30, "skipped": 1, "fallback": 180}
    # A layer the library left alone without the plan knowing is reported, not counted as quantized.
    model = modeling.load(smollm2, "bfloat16", "cpu")
    checked = reconcile(plan_recipe(skeleton, RECIPES["bnb-int8"]), model, RECIPES["bnb-int8"])
    assert summarize(checked) == {"quantized": 0, "skipped": 1, "fallback": 210}


@pytest.mark.gpu
@pytest.mark.parametrize("name", CUDA_RECIPES + CPU_RECIPES)
def test_recipe_on_gpu(smollm2, tmp_path, name):
    result = run_recipe(smollm2, tmp_path, name, device="cuda")
    assert result["status"] == "ok", result.get("reason")
    assert result["roundtrip"]["finite"]


@pytest.mark.skipif(importlib.util.find_spec("mslk") is not None, reason="mslk is installed here")
def test_int4_plain_packing_without_mslk_is_a_clear_error():
    recipe = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[torchao-int4-weight-only]"]).recipes[0]
    recipe = recipe.model_copy(update={"int4_packing_format": "plain"})
    with pytest.raises(ValueError, match="torchao-int4-weight-only: int4_packing_format 'plain' needs the mslk"):
        backend_of(recipe).load_config(recipe, [])
    assert backend_of(recipe).load_config(recipe.model_copy(update={"int4_packing_format": "tile_packed_to_4d"}), [])


HEAD_TOO = "recipes=[{use: torchao-int8-weight-only, quantize_output_embedding: true}]"


def test_a_recipe_that_quantizes_the_head_unties_it_and_ships_it_quantized(tiny_llama, tmp_path):
    recipe = load_config(PROJECT / "configs" / "default.yaml", [HEAD_TOO]).recipes[0]
    result = step.quantize(str(tiny_llama), recipe, "bfloat16", "cpu", str(tmp_path), roundtrip_min_top1=0.9)
    assert result.status == "ok", result.reason
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["summary"] == {"quantized": 15, "skipped": 0, "fallback": 0}
    assert plan["modules"][-1] == {"module": "lm_head", "shape": [49152, 64], "status": "quantized"}
    # Untied: the input embedding stays in bf16 (6.3 MB) beside the int8 head, and the estimate counts both; it leaves
    # out int8's scale per row, 3% of this 64-wide model's weights.
    assert 0 < result.checkpoint_bytes / result.checkpoint_bytes_estimated - 1 < 0.04
    assert json.loads((tmp_path / "checkpoint" / "config.json").read_text())["tie_word_embeddings"] is False
    reloaded = step.load_saved(tmp_path / "checkpoint", recipe, "cpu")
    assert type(reloaded.lm_head.weight).__name__ == "Int8Tensor"
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert result.roundtrip["top1_agreement"] == 1.0


def test_torchao_leaves_a_model_without_a_head_alone():
    from transformers import LlamaConfig, LlamaModel

    model = LlamaModel(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2))
    assert model.get_output_embeddings() is None
    for recipe in load_config(PROJECT / "configs" / "default.yaml", [HEAD_TOO]).recipes + [RECIPES["torchao-int8-weight-only"]]:
        assert backend_of(recipe).after_load(model, recipe, [], None) is model


def test_the_disk_estimate_of_an_untied_head_counts_it_once(tiny_tokenizer, tmp_path):
    """On the skeleton (meta device) every data_ptr is 0: an untied head must not read as tied to the embedding."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "untied")
    for file in tiny_tokenizer.iterdir():
        shutil.copy(file, tmp_path / "untied" / file.name)
    recipe = load_config(PROJECT / "configs" / "default.yaml", [HEAD_TOO]).recipes[0]
    result = step.quantize(str(tmp_path / "untied"), recipe, "bfloat16", "cpu", str(tmp_path / "q"),
                           roundtrip_min_top1=0.9)
    assert result.status == "ok", result.reason
    # bf16 embedding 1.0 MB and int8 head 0.5 MB; an estimate that took the head for tied would add 1.0 MB more.
    assert 0 < result.checkpoint_bytes / result.checkpoint_bytes_estimated - 1 < 0.04


def test_a_checkpoint_is_saved_in_shards_that_hash_at_once(tiny_llama, tmp_path, monkeypatch):
    import quantgate.backends

    monkeypatch.setattr(quantgate.backends, "SHARD_SIZE", "2MB")  # the tiny model's 6.3 MB embedding stays whole
    result = step.quantize(str(tiny_llama), RECIPES["torchao-int8-weight-only"], "bfloat16", "cpu", str(tmp_path),
                           roundtrip_min_top1=0.9)
    assert result.status == "ok", result.reason
    shards = sorted(p.name for p in (tmp_path / "checkpoint").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "checkpoint" / "model.safetensors.index.json").is_file(), shards
    assert result.roundtrip["top1_agreement"] == 1.0


def int4_part(rows: int, first_value: int, k: int = 256, group: int = 128):
    """A tinygemm-layout int4 weight of `rows` rows (padded to whole 8-row tiles) whose bytes count up from
    first_value: built directly, as torchao's quantize_ (CUDA only) would lay it out."""
    from torchao.quantization.quantize_.workflows.int4.int4_tile_packed_to_4d_tensor import Int4TilePackedTo4dTensor

    tiles = -(-rows // 8)
    qdata = torch.arange(first_value, first_value + tiles * (k // 128) * 32 * 4, dtype=torch.int32).reshape(
        tiles, k // 128, 32, 4)
    scale_and_zero = torch.full((k // group, tiles * 8, 2), float(first_value // 1000), dtype=torch.bfloat16)
    return Int4TilePackedTo4dTensor(qdata, scale_and_zero, [1, group], torch.Size([rows, k]))


def test_int4_parts_stack_by_rows_in_order():
    from quantgate.backends.torchao import stackable, stacked_rows

    parts = [int4_part(16, 0), int4_part(8, 10_000), int4_part(5, 20_000)]  # only the last padded
    assert stackable(parts)
    stacked = stacked_rows(parts)
    assert stacked.shape == (29, 256)
    # Tiles of 8 rows: the first part's two, then the second's one, then the last's (padded) one.
    assert [int(stacked.qdata[t, 0, 0, 0]) for t in range(4)] == [0, 256, 10_000, 20_000]
    assert stacked.scale_and_zero.shape == (2, 32, 2)
    assert stacked.scale_and_zero[0, :, 0].tolist() == [0.0] * 16 + [10.0] * 8 + [20.0] * 8
    # Padding inside the stack would shift every later row: refused.
    assert not stackable([int4_part(5, 0), int4_part(8, 10_000)])
    assert not stackable([int4_part(8, 0), int4_part(8, 10_000, group=64)])


def test_an_int4_weight_stacked_by_rows_saves_and_loads_as_torchao_made_it():
    """transformers saves and loads a torchao checkpoint through torchao's safetensors flattening: the stacked weight
    comes back whole, its class, shape and groups kept."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict, unflatten_tensor_state_dict

    from quantgate.backends.torchao import stacked_rows

    stacked = stacked_rows([int4_part(16, 0), int4_part(5, 10_000)])
    loaded, left = unflatten_tensor_state_dict(*flatten_tensor_state_dict({"lm_head.weight": stacked}))
    back = loaded["lm_head.weight"]
    assert type(back) is type(stacked) and back.shape == (21, 256) and back.block_size == [1, 128] and not left
    assert torch.equal(back.qdata, stacked.qdata) and torch.equal(back.scale_and_zero, stacked.scale_and_zero)


@pytest.mark.gpu
def test_a_head_quantized_by_rows_matches_it_quantized_whole_in_less_memory():
    """torchao's int4 (HQQ's search, in float32) on a head of 40,004 rows, 4,096 at a time, against at once: the same
    products within HQQ's search noise, the same storage, a fraction of the peak memory."""
    from torchao.quantization import quantize_

    from quantgate.backends.torchao import quantize_by_rows, quant_type

    recipe = RECIPES["torchao-int4-weight-only"]
    torch.manual_seed(0)
    weight = torch.randn(40_004, 1024, device="cuda", dtype=torch.bfloat16) / 32
    x = torch.randn(3, 1024, device="cuda", dtype=torch.bfloat16)
    heads, peaks = {}, {}
    for how in ("whole", "by_rows"):
        head = torch.nn.Linear(1024, 40_004, bias=False, device="cuda", dtype=torch.bfloat16)
        head.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        quantize_(head, quant_type(recipe)) if how == "whole" else quantize_by_rows(head, quant_type(recipe), 4096)
        peaks[how] = torch.cuda.max_memory_allocated() - start
        heads[how] = head
    whole, by_rows = heads["whole"].weight, heads["by_rows"].weight
    assert type(by_rows) is type(whole) and by_rows.shape == whole.shape == (40_004, 1024)
    assert by_rows.qdata.shape == whole.qdata.shape and by_rows.scale_and_zero.shape == whole.scale_and_zero.shape
    with torch.no_grad():
        exact, a, b = x @ weight.T, heads["whole"](x), heads["by_rows"](x)
    error = {name: float((y - exact).float().norm() / exact.float().norm())
             for name, y in (("whole", a), ("by_rows", b))}
    assert error["by_rows"] < 1.05 * error["whole"], error
    assert peaks["by_rows"] < peaks["whole"] / 3, peaks
