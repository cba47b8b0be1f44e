"""Validate step on the real SmolLM2: fault injection, thresholds on both sides, the cached reference."""

import pytest
import torch

from quantgate import modeling
from quantgate.backends import ValidateThresholds
from quantgate.config import load_config
from quantgate.settings import ValidateSettings
from quantgate import drift
from quantgate.results import ReferenceValidation
from tasks import validate as step
from tests.conftest import COMPUTE, PROJECT, SHORT_PROMPTS, edit_weights, edited_copy

# The shipped prompts without the three long ones, one short generation: what a planted fault shows on
# (the long prompts' positions: tests/test_longrange.py).
SETTINGS = ValidateSettings(prompts=SHORT_PROMPTS, generate_prompts=1, max_new_tokens=8)
INT8 = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[bnb-int8]"]).recipes[0]


@pytest.fixture(scope="module")
def reference(smollm2, cache_dir):
    from transformers import AutoTokenizer

    model = modeling.load(smollm2, COMPUTE, "cpu")
    return drift.reference_stats(model, AutoTokenizer.from_pretrained(smollm2), "sha-of-smollm2", "bfloat16",
                                cache_dir, SETTINGS)


def edited_checkpoint(smollm2, tmp_path, edit, dtype=None):
    """A copy of SmolLM2 with its state dict changed by `edit` (a checkpoint that loads fine)."""
    def change(weights):
        if dtype is not None:
            weights.update({k: v.to(dtype) for k, v in weights.items()})
        edit(weights)

    folder = edited_copy(smollm2, tmp_path / "edited", change)
    if dtype is not None:
        config = (folder / "config.json").read_text().replace('"bfloat16"', f'"{str(dtype).split(".")[1]}"')
        (folder / "config.json").write_text(config)
    return folder


def run(folder, reference, recipe=INT8, compute_dtype=COMPUTE, generated=None):
    return step.validate(str(folder), recipe, ReferenceValidation(**reference), "cpu", SETTINGS,
                         compute_dtype, generated=generated).model_dump()


def test_prompt_set():
    prompts = drift.load_prompts(ValidateSettings())
    assert len(prompts) >= 16 and len({p["id"] for p in prompts}) == len(prompts)
    assert {"chat", "prose", "code", "numbers", "multilingual", "long"} <= {p["kind"] for p in prompts}


def test_unchanged_model_passes_exactly(smollm2, reference):
    result = run(smollm2, reference)
    assert result["verdict"] == "pass" and result["status"] == "ok" and result["reasons"] == []
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0 and result["top5_overlap"] == 1.0
    stats = torch.load(reference["path"], weights_only=True)
    assert result["first_nonfinite_module"] is None and result["prompts"] == len(drift.load_prompts(SETTINGS)) == 17
    assert result["tokens"] == sum(p["ids"].shape[1] for p in stats["prompts"])
    assert all(c > 0.9999 for c in result["hidden_cosine"])
    assert all(g["reference"] == g["quantized"] for g in result["generations"])


def test_generations_made_before_the_reference_stand_in_for_validate_s_own(smollm2, reference, tmp_path):
    from quantgate.files import save_tensors

    made = step.generate(str(smollm2), INT8, "cpu", SETTINGS, str(tmp_path), COMPUTE)
    saved = torch.load(made.path, weights_only=True)
    assert made.status == "ok" and len(saved["short"]) == SETTINGS.generate_prompts
    plain = run(smollm2, reference)
    before = run(smollm2, reference, generated=made.path)
    assert before["generated_before"] is True and before["generations"] == plain["generations"]
    assert before["verdict"] == plain["verdict"] == "pass" and "generated_before" not in plain
    # What validate sets beside the reference's is the file's: a planted text shows.
    save_tensors(planted := tmp_path / "planted.pt", {"short": dict.fromkeys(saved["short"], "planted"), "long": []})
    assert [g["quantized"] for g in run(smollm2, reference, generated=str(planted))["generations"]] == ["planted"]


def test_nan_in_a_weight_names_that_module(smollm2, tmp_path, reference):
    def plant(w):
        w["model.layers.4.self_attn.q_proj.weight"][7, 3] = float("nan")

    result = run(edited_checkpoint(smollm2, tmp_path, plant), reference)
    assert result["verdict"] == "fail" and result["status"] == "failed"
    assert result["first_nonfinite_module"] == "model.layers.4.self_attn.q_proj"
    assert result["reason"].startswith("non-finite output from model.layers.4.self_attn.q_proj on")
    nf = result["nonfinite"]
    assert nf["input_finite"] is True and nf["weight_finite"] is False and nf["output_nan"] is True
    assert nf["input_dtype"] == f"torch.{COMPUTE}" and nf["input_max_abs"] > 0
    assert "model.layers.4.self_attn" in nf["affected_after"] and "lm_head" in nf["affected_after"]
    assert result["first_nonfinite_layer"] == 5  # hidden_states[5] is layer 4's output


def test_nan_in_a_quantization_scale_names_that_module(smollm2, tmp_path, reference):
    from tasks.quantize import quantize

    quantize(str(smollm2), INT8, "bfloat16", "cpu", str(tmp_path / "q"), 0.9)
    folder = tmp_path / "q" / "checkpoint"
    def nan_scale(weights):
        weights["model.layers.4.self_attn.q_proj.SCB"][11] = float("nan")  # LLM.int8()'s per-row scale

    edit_weights(folder, nan_scale)
    result = run(folder, reference)
    assert result["verdict"] == "fail" and result["reason"] == (
        "model.layers.4.self_attn.q_proj's stored SCB: 1 NaN or Inf value, before any forward")


def test_fp16_overflow_is_caught(smollm2, tmp_path, reference):
    def scale(w):
        w["model.layers.3.mlp.down_proj.weight"] *= 4096  # outputs pass fp16's 65504

    # "auto": the checkpoint's own float16, whose range is the point
    result = run(edited_checkpoint(smollm2, tmp_path, scale, dtype=torch.float16), reference, compute_dtype="auto")
    assert result["verdict"] == "fail"
    assert result["first_nonfinite_module"] == "model.layers.3.mlp.down_proj"
    assert result["nonfinite"]["output_inf"] is True and result["nonfinite"]["input_finite"] is True


def perturbed(smollm2, tmp_path, reference, relative):
    torch.manual_seed(0)

    def noise(w):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            t = w[f"model.layers.10.{name}.weight"]
            w[f"model.layers.10.{name}.weight"] = (t.float() + relative * t.float().std() * torch.randn_like(t.float())).to(t.dtype)

    return run(edited_checkpoint(smollm2, tmp_path, noise), reference)


def test_large_perturbation_of_one_layer_fails_on_kl(smollm2, tmp_path, reference):
    result = perturbed(smollm2, tmp_path, reference, relative=30.0)
    assert result["verdict"] == "fail" and result["first_nonfinite_module"] is None
    assert result["kl_mean"] > INT8.thresholds.kl_mean_fail
    assert any(r.startswith("mean KL") and "(fail threshold)" in r for r in result["reasons"])
    assert result["max_divergence_layer"] >= 10  # hidden states agree up to the perturbed layer
    assert all(c > 0.999 for c in result["hidden_cosine"][:11])


def test_tiny_perturbation_passes(smollm2, tmp_path, reference):
    result = perturbed(smollm2, tmp_path, reference, relative=0.01)
    assert result["verdict"] == "pass", result["reasons"]
    assert 0 < result["kl_mean"] < INT8.thresholds.kl_mean_warn


@pytest.mark.parametrize("key,metric,higher_is_worse", [
    ("kl_mean", "kl_mean", True), ("kl_p99", "kl_p99", True), ("top1", "top1_agreement", False)])
@pytest.mark.parametrize("level", ["warn", "fail"])
def test_each_threshold_on_each_side(key, metric, higher_is_worse, level):
    metrics = {"kl_mean": 0.1, "kl_p99": 1.0, "top1_agreement": 0.8, "first_nonfinite_module": None}
    value, step_ = metrics[metric], 1e-6
    lax = ValidateThresholds(kl_mean_warn=10, kl_mean_fail=10, kl_p99_warn=10, kl_p99_fail=10, top1_warn=0, top1_fail=0)
    # A threshold just on the good side of the value: not triggered.
    good = value + step_ if higher_is_worse else value - step_
    bad = value - step_ if higher_is_worse else value + step_
    fields = {f"{key}_{level}": good}
    if level == "warn" and higher_is_worse is False:
        fields[f"{key}_fail"] = 0
    assert drift.verdict(metrics, lax.model_copy(update=fields)) == ("pass", [])
    fields[f"{key}_{level}"] = bad
    result, reasons = drift.verdict(metrics, lax.model_copy(update=fields))
    assert result == level and len(reasons) == 1 and f"({level} threshold)" in reasons[0]


def test_reference_is_cached_and_keyed(smollm2, cache_dir, reference):
    again = drift.reference_stats(None, None, "sha-of-smollm2", "bfloat16", cache_dir, SETTINGS)
    assert again["cached"] is True and again["path"] == reference["path"]
    other = drift.reference_key("sha-of-smollm2", "bfloat16", SETTINGS.model_copy(update={"top_k": 32}))
    assert other not in reference["path"]
    assert drift.reference_key("another-checkpoint", "bfloat16", SETTINGS) not in reference["path"]


def test_broken_reference_is_told_apart(smollm2, tmp_path, cache_dir):
    from transformers import AutoTokenizer

    def plant(w):
        w["model.layers.2.mlp.up_proj.weight"][0, 0] = float("inf")

    folder = edited_checkpoint(smollm2, tmp_path, plant)
    broken = drift.reference_stats(modeling.load(folder, COMPUTE, "cpu"), AutoTokenizer.from_pretrained(folder),
                                  "sha-of-broken", "bfloat16", tmp_path / "c", SETTINGS)
    assert broken["first_nonfinite_module"] == "model.layers.2.mlp.up_proj"
    result = run(folder, broken)
    assert result["verdict"] == "fail" and "a broken base model, not a broken quantization" in result["reason"]


def test_generation_error_is_a_failure_not_a_crash(smollm2, reference, monkeypatch):
    def device_assert(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered\nmore")

    monkeypatch.setattr(drift, "generate", device_assert)
    result = run(smollm2, reference)
    assert result["verdict"] == "fail"
    assert "generation raised RuntimeError: CUDA error: device-side assert triggered" in result["reason"]


def test_compute_dtype_is_float32_where_bf16_would_be_emulated(monkeypatch):
    monkeypatch.setattr(modeling, "native_bf16", lambda: False)
    assert modeling.compute_dtype("bfloat16", "cpu") == "float32"
    assert modeling.compute_dtype("bfloat16", "cpu", requested="bfloat16") == "bfloat16"
    monkeypatch.setattr(modeling, "native_bf16", lambda: True)
    assert modeling.compute_dtype("bfloat16", "cpu") == "bfloat16"
    assert modeling.compute_dtype("float16", "cpu") == "float32"  # no CPU here multiplies fp16 natively
    monkeypatch.undo()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below AVX512-BF16: emulated again
    assert not modeling.native_bf16()


def test_a_bf16_checkpoint_validates_in_float32(smollm2, tmp_path):
    from transformers import AutoTokenizer

    settings = SETTINGS.model_copy(update={"generate_prompts": 0})  # logits are the point here
    model = modeling.load(smollm2, "float32", "cpu")
    reference = drift.reference_stats(model, AutoTokenizer.from_pretrained(smollm2), "sha-of-smollm2", "float32",
                                     tmp_path, settings)
    result = step.validate(str(smollm2), INT8, ReferenceValidation(**reference), "cpu", settings,
                           compute_dtype="float32").model_dump()
    assert result["compute_dtype"] == "float32" and result["verdict"] == "pass"
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0
