"""Block FP8 without a GPU or the Hub: quantgate's reference kernel against the block scaling, and the
seed's failure reproduced: a layer whose 128x128 blocks go NaN where 64x64 blocks stay finite."""
import json
from pathlib import Path

import pytest
import torch

from quantgate import modeling
from quantgate.backends import fp8_kernel
from quantgate.config import load_config
from quantgate.settings import ValidateSettings
from quantgate.plan import tower_lines
from quantgate import drift
from quantgate.loading import load_saved
from quantgate.results import ReferenceValidation
from tasks import quantize as quantize_step
from tasks import validate as validate_step
from tests.conftest import PROJECT, edit_weights


def blocky(n: int, k: int, block: tuple[int, int], experts: int | None = None):
    """e4m3 weights with power-of-two block scales: their exact product is known in float64."""
    shape = (experts, n, k) if experts else (n, k)
    weight = (torch.randn(shape) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_shape = (*shape[:-2], n // block[0], k // block[1])
    scale = torch.pow(2.0, torch.randint(-12, -4, scale_shape).float())
    return weight, scale


def exact(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The product in float64, activations quantized per token and K block as the Hub kernel does."""
    groups = x.double().unflatten(-1, (-1, block[1]))
    s = groups.abs().amax(-1, keepdim=True) / 448
    a = ((groups / s.clamp(min=1e-12)).to(torch.float8_e4m3fn).double() * s).flatten(-2)
    w = weight.double() * scale.double().repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
    return a @ w.T


def test_matmul_2d_is_the_block_scaled_product():
    torch.manual_seed(0)
    weight, scale = blocky(256, 384, (128, 128))
    x = torch.randn(3, 5, 384)
    x[0, 0, 128:256] = 0  # an all-zero activation group: the scale's floor keeps it finite
    out = fp8_kernel.matmul_2d(x, weight, scale, [128, 128], torch.float32)
    assert out.shape == (3, 5, 256) and torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exact(x, weight, scale, (128, 128)), rtol=1e-5, atol=1e-4)


def test_batched_and_grouped_expert_matmuls_match_one_expert_at_a_time():
    torch.manual_seed(1)
    weight, scale = blocky(128, 256, (64, 64), experts=4)
    x = torch.randn(10, 256)
    ids = torch.tensor([3, 0, 0, 2, 3, 3, 0, 2, 2, 0])
    one_by_one = torch.stack([fp8_kernel.matmul_2d(x[i:i + 1], weight[e], scale[e], [64, 64])[0]
                              for i, e in enumerate(ids.tolist())])
    close = {"rtol": 1e-5, "atol": 1e-4}  # float32 sums in another order
    torch.testing.assert_close(fp8_kernel.matmul_batched(x, weight, scale, [64, 64], ids), one_by_one, **close)
    order = torch.argsort(ids, stable=True)
    counts = torch.bincount(ids, minlength=4)
    grouped = fp8_kernel.matmul_grouped(x[order], weight, scale, torch.cumsum(counts, 0).int(), counts, [64, 64])
    torch.testing.assert_close(grouped, one_by_one[order], **close)


def test_kept_float_weights_give_the_same_products_and_follow_an_edit(monkeypatch):
    torch.manual_seed(2)
    weight, scale = blocky(128, 192, (64, 64))
    weight, x = torch.nn.Parameter(weight, requires_grad=False), torch.randn(4, 192)
    monkeypatch.setattr(fp8_kernel, "keep_bytes", 0)
    fresh = fp8_kernel.matmul_2d(x, weight, scale, [64, 64])
    assert not fp8_kernel._kept
    monkeypatch.setattr(fp8_kernel, "keep_bytes", 1 << 20)
    assert torch.equal(fp8_kernel.matmul_2d(x, weight, scale, [64, 64]), fresh)
    assert torch.equal(fp8_kernel.matmul_2d(x, weight, scale, [64, 64]), fresh) and id(weight) in fp8_kernel._kept
    with torch.no_grad():
        weight.copy_(weight.flip(0))  # edited in place, as a test plants a fault: the kept copy is stale
    edited = fp8_kernel.matmul_2d(x, weight.detach().clone(), scale, [64, 64])  # another tensor: computed afresh
    assert not torch.equal(edited, fresh) and torch.equal(fp8_kernel.matmul_2d(x, weight, scale, [64, 64]), edited)
    weight.data = weight.data.flip(0).contiguous()  # new storage, the version counter as it was
    assert torch.equal(fp8_kernel.matmul_2d(x, weight, scale, [64, 64]), fresh)
    assert not torch.equal(fp8_kernel.matmul_2d(x, weight, scale * 2, [64, 64]), fresh)  # other scales, same weight
    key = id(weight)
    del weight
    assert key not in fp8_kernel._kept  # freed with its layer
    big, big_scale = blocky(1024, 512, (64, 64))  # 2 MiB in float32, over the budget: computed at every call
    fp8_kernel.matmul_2d(torch.randn(1, 512), big, big_scale, [64, 64])
    assert id(big) not in fp8_kernel._kept


def test_scales_laid_out_for_the_block_scaled_matmul_keep_their_values(monkeypatch):
    """A 128x128 layer whose scale rows are 30 blocks wide (Gemma 3 12B's 3840 inputs) gets rows padded to 32 once,
    as torch's block-scaled matmul reads them; its values, shape and products stay as they were."""
    from transformers.integrations.finegrained_fp8 import FP8Linear

    torch.manual_seed(3)
    layer = FP8Linear(3840, 256, block_size=(128, 128))
    layer.weight.data, layer.weight_scale_inv.data = blocky(256, 3840, (128, 128))
    plain = torch.nn.Module()
    plain.weight, plain.weight_scale_inv = torch.nn.Parameter(torch.ones(256, 3840)), torch.nn.Parameter(torch.ones(2, 30))
    before, x = layer.weight_scale_inv.detach().clone(), torch.randn(2, 3840)
    expected = fp8_kernel.matmul_2d(x, layer.weight, layer.weight_scale_inv, [128, 128], torch.float32)
    assert fp8_kernel.lay_out_scales(torch.nn.Sequential(layer)) == 0  # no block-scaled matmul in this process
    monkeypatch.setattr(fp8_kernel, "_blockwise", True)
    model = torch.nn.Sequential(layer, FP8Linear(256, 128, block_size=(64, 64)), plain)
    assert fp8_kernel.lay_out_scales(model) == 1  # the 64x64 layer and the module without block_size stay
    scales = layer.weight_scale_inv
    assert scales.shape == (2, 30) and scales.stride() == (32, 1) and torch.equal(scales, before)
    read = fp8_kernel.weight_scales(scales)  # in place, no copy per call
    assert read.data_ptr() == scales.data_ptr() and read.shape == (32, 2) and read.stride() == (1, 32)
    padded = fp8_kernel.weight_scales(before)  # a layer not laid out: padded at the call
    assert padded.stride() == (1, 32) and torch.equal(padded[:30], before.t()) and not padded[30:].any()
    assert fp8_kernel.lay_out_scales(model) == 0
    assert not fp8_kernel.blockwise_runs(x, layer.weight, scales, [128, 128], None, None)  # a CPU tensor: the reference
    assert fp8_kernel.fits_blockwise(layer.weight, scales, torch.bfloat16)
    ragged, ragged_scales = blocky(256, 3840 + 64, (64, 64))  # a checkpoint made elsewhere: its edge blocks ragged
    assert not fp8_kernel.fits_blockwise(ragged, ragged_scales[::2, ::2], torch.bfloat16)
    assert not fp8_kernel.fits_blockwise(layer.weight, scales.to(torch.float8_e8m0fnu), torch.bfloat16)  # UE8M0
    assert not fp8_kernel.fits_blockwise(layer.weight, scales, torch.float16)  # an output the probe did not check
    codes, token = fp8_kernel.activation_blocks(x[:1])  # one token, as a decode step has it: padded to 4 rows
    four, laid = fp8_kernel.four_rows(codes, token)
    assert four.shape == (4, 3840) and torch.equal(four[:1].view(torch.uint8), codes.view(torch.uint8))
    assert not four[1:].view(torch.uint8).any() and laid.stride() == (1, 4) and torch.equal(laid[:1], token)
    torch.testing.assert_close(fp8_kernel.matmul_2d(x, layer.weight, scales, [128, 128], torch.float32), expected)


def test_the_kernel_named_follows_the_block_size(monkeypatch):
    from quantgate.backends import backend_of, parse_recipe

    block128, block64 = parse_recipe({"name": "fp8-block128", "method": "fp8"}), \
        parse_recipe({"name": "fp8-block64", "method": "fp8", "weight_block_size": [64, 64]})
    backend = backend_of(block128)
    assert backend.kernel(block128) == backend.kernel(block64) == fp8_kernel.REFERENCE  # no GPU here
    assert "not an FP8 serving kernel" in backend.latency_caveat(block128)
    monkeypatch.setattr(fp8_kernel, "_scaled_mm_ran", True)  # as after a forward on a Hopper GPU
    assert backend.kernel(block128) == fp8_kernel.SCALED_MM and "kernels of their own" in backend.latency_caveat(block128)
    assert backend.kernel(block64) == fp8_kernel.REFERENCE and "correctness reference" in backend.latency_caveat(block64)


@pytest.mark.gpu
def test_block_scaled_matmul_on_the_gpu_computes_what_the_reference_does():
    """torch's block-scaled FP8 matmul against the reference on Gemma 3 12B's shapes, one token and five, eager and
    compiled, with its scales padded per call and laid out once."""
    fp8_kernel.install()
    if not fp8_kernel.probe(torch.device("cuda")):
        pytest.skip(f"no block-scaled FP8 matmul on {torch.cuda.get_device_name()} with torch {torch.__version__}")
    torch.manual_seed(4)
    for n, k in ((8192, 3840), (3840, 15360)):
        weight, scale = (t.cuda() for t in blocky(n, k, (128, 128)))
        for rows in (1, 5):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
            reference = fp8_kernel._product(x, fp8_kernel.dequantize_weight(weight, scale, (128, 128)), (128, 128))
            for call in (fp8_kernel.blockwise_matmul, torch.compile(fp8_kernel.blockwise_matmul, fullgraph=True)):
                out = call(x, weight, scale, torch.float32)  # scales padded per call
                error = ((out - reference).norm() / reference.norm()).item()
                assert out.shape == (rows, n) and error < 1e-3, (n, k, rows, error)
        layer = torch.nn.Module()
        layer.weight, layer.weight_scale_inv, layer.block_size = weight, torch.nn.Parameter(scale), (128, 128)
        fp8_kernel.lay_out_scales(layer)
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        torch.testing.assert_close(fp8_kernel.matmul_2d(x, weight, layer.weight_scale_inv, [128, 128], torch.float32),
                                   fp8_kernel.blockwise_matmul(x, weight, scale, torch.float32))


@pytest.fixture(scope="module")
def tiny(smollm2, tmp_path_factory):
    """A small random Llama whose layers 128x128 blocks divide, with SmolLM2's tokenizer, and a copy of it
    whose layer 1 q_proj holds one 128x128 block of tiny weights around a 64x64 block of zeros."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("fp8") / "tiny"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    planted = folder.with_name("planted")
    LlamaForCausalLM.from_pretrained(folder).save_pretrained(planted)  # same weights, own folder
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(planted)
    def pruned(weights):
        q = weights["model.layers.1.self_attn.q_proj.weight"]
        q[:128, :128] = (torch.randint(0, 2, (128, 128)) * 2 - 1).to(torch.bfloat16) * 1e-37  # pruned to nothing
        q[:64, :64] = 0

    edit_weights(planted, pruned)
    return folder, planted


def gate(checkpoint, block: str, out, cache_dir):
    from transformers import AutoTokenizer

    recipe = load_config(PROJECT / "configs" / "default.yaml", [f"recipes=[{block}]"]).recipes[0]
    quantized = quantize_step.quantize(str(checkpoint), recipe, "bfloat16", "cpu", str(out / block), 0.9).model_dump()
    assert quantized["status"] == "ok", quantized.get("reason")
    reference = drift.reference_stats(modeling.load(checkpoint, "bfloat16", "cpu"),
                                      AutoTokenizer.from_pretrained(checkpoint), checkpoint.name,
                                      "bfloat16", cache_dir, ValidateSettings())
    return quantized, validate_step.validate(quantized["checkpoint"], recipe, ReferenceValidation(**reference), "cpu",
                                             ValidateSettings()).model_dump()


def test_tiny_blocks_go_nan_at_128_and_stay_finite_at_64(tiny, tmp_path, cache_dir):
    _, planted = tiny
    q128, v128 = gate(planted, "fp8-block128", tmp_path, cache_dir)
    # The stored block went NaN: the checkpoint's files fail it before any forward, naming the module and tensor.
    assert v128["verdict"] == "fail" and v128["reason"].startswith("model.layers.1.self_attn.q_proj's stored weight")
    assert {f["module"] for f in v128["stored"]["findings"]} == {"model.layers.1.self_attn.q_proj"}
    assert "first_nonfinite_module" not in v128  # no forward ran
    assert q128["warnings"] == ["the quantized model gives non-finite logits, before saving and after reloading alike"]
    q64, v64 = gate(planted, "fp8-block64", tmp_path, cache_dir)
    assert v64["verdict"] == "pass" and v64["first_nonfinite_module"] is None, v64["reasons"]
    assert q64["roundtrip"]["finite"] and v64["kl_mean"] < 0.01 and v64["kernel"] == fp8_kernel.REFERENCE
    # The base's 64x64 block of zeros stores zeros, and its three blocks of 1e-37 zero scales: noted, not failed.
    assert v64["stored"]["findings"] == [] and v64["stored"]["notes"] == [
        {"module": "model.layers.1.self_attn.q_proj", "tensor": "weight", "problem": "all-zero blocks", "count": 1},
        {"module": "model.layers.1.self_attn.q_proj", "tensor": "weight_scale_inv", "problem": "zero", "count": 3}]


def test_both_block_sizes_pass_on_the_unplanted_model(tiny, tmp_path, cache_dir):
    clean, _ = tiny
    for block in ("fp8-block128", "fp8-block64"):
        quantized, checked = gate(clean, block, tmp_path, cache_dir)
        # A random model's logits are nearly flat, so its top-1 flips on noise: KL is the measure here.
        assert checked["first_nonfinite_module"] is None and checked["kl_mean"] < 0.01, (block, checked["reasons"])
        saved = json.loads((tmp_path / block / "checkpoint" / "config.json").read_text())["quantization_config"]
        assert saved["quant_method"] == "fp8" and saved["weight_block_size"] == [int(block[-3:].lstrip("k"))] * 2


def test_gemma4_moe_with_its_vision_tower_skipped(smollm2, tmp_path, cache_dir):
    """The Gemma 4 31B config's recipe (64x64 blocks, vision tower and lm_head skipped) on a tiny random Gemma 4
    whose text layers are mixture-of-experts blocks (Gemma4TextExperts): the experts are planned, quantized
    (transformers' FP8Experts, on the reference kernel) and validated."""
    from transformers import AutoTokenizer, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    text = Gemma4TextConfig(vocab_size=49152, vocab_size_per_layer_input=49152, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            global_head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=64, top_k_experts=2,
                            moe_intermediate_size=128)
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32)
    torch.manual_seed(0)
    folder = tmp_path / "gemma4-moe"
    Gemma4ForConditionalGeneration(Gemma4Config(text_config=text, vision_config=vision, audio_config=None)) \
        .to(torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    recipe = load_config(PROJECT / "configs" / "gemma4-31b-it.yaml").recipes[0]
    assert recipe.skip == ["model.vision_tower", "lm_head"] and recipe.weight_block_size == (64, 64)

    quantized = quantize_step.quantize(str(folder), recipe, "bfloat16", "cpu", str(tmp_path / "q"), 0.9).model_dump()
    assert quantized["status"] == "ok" and quantized["roundtrip"]["identical"], quantized.get("reason")
    plan = {e["module"]: e for e in json.loads((tmp_path / "q" / "plan.json").read_text())["modules"]}
    for layer in (0, 1):
        experts = plan[f"model.language_model.layers.{layer}.experts"]
        assert experts["kind"] == "experts" and experts["status"] == "quantized"
        assert experts["shape"] == {"gate_up_proj": [64, 256, 128], "down_proj": [64, 128, 128]}
    tower = [e for name, e in plan.items() if name.startswith("model.vision_tower.")]
    assert tower and all(e["status"] == "skipped" for e in tower)
    # The seed config skips the tower, not its projector (Gemma 4's embed_vision): the plan says so per tower.
    assert tower_lines(quantized["towers"]) == ["model.vision_tower: 0 of 8 quantized (skip pattern 'model.vision_tower')",
                                                "model.embed_vision: 1 of 1 quantized"]
    model = load_saved(tmp_path / "q" / "checkpoint", recipe, "cpu")
    assert type(model.model.language_model.layers[0].experts).__name__.startswith("FP8Experts")
    assert model.model.vision_tower.encoder.layers[0].mlp.up_proj.linear.weight.dtype == torch.bfloat16
    reference = drift.reference_stats(modeling.load(folder, "bfloat16", "cpu"),
                                      AutoTokenizer.from_pretrained(folder), "gemma4-moe", "bfloat16",
                                      cache_dir, ValidateSettings())
    checked = validate_step.validate(quantized["checkpoint"], recipe, ReferenceValidation(**reference), "cpu",
                                     ValidateSettings()).model_dump()
    assert checked["first_nonfinite_module"] is None and checked["kl_mean"] < 0.01, checked["reasons"]


def test_a_nan_stored_scale_is_named_with_its_tensor(tiny, tmp_path, cache_dir):
    """A published FP8 checkpoint whose stored weight_scale_inv holds a NaN (the compressed-tensors and
    Model-Optimizer reports): it fails from its files before any forward, naming the module and the tensor."""
    clean, _ = tiny
    quantized, _ = gate(clean, "fp8-block64", tmp_path, cache_dir)

    def nan_scale(weights):
        weights["model.layers.1.self_attn.q_proj.weight_scale_inv"][0, 0] = float("nan")

    edit_weights(Path(quantized["checkpoint"]), nan_scale)
    recipe = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[fp8-block64]"]).recipes[0]
    reference = drift.reference_stats(modeling.load(clean, "bfloat16", "cpu"), None, clean.name, "bfloat16", cache_dir,
                                      ValidateSettings())
    checked = validate_step.validate(quantized["checkpoint"], recipe, ReferenceValidation(**reference), "cpu",
                                     ValidateSettings())
    assert checked.verdict == "fail" and checked.record()["stored"]["findings"] == [
        {"module": "model.layers.1.self_attn.q_proj", "tensor": "weight_scale_inv", "problem": "NaN or Inf", "count": 1}]
    assert checked.reason == ("model.layers.1.self_attn.q_proj's stored weight_scale_inv: 1 NaN or Inf value, before "
                              "any forward"), checked.reason


def test_the_remedy_of_128x128_blocks_passes_with_finer_blocks(tiny, tmp_path):
    """Seed 004's shape: fp8-block128 fails on layer 1's q_proj; the attribution starts from the module that goes NaN,
    and the remedy's first variant, 64x64 blocks, passes for real at a cost within 1% of the recipe's bytes."""
    from quantgate import cli
    from tests.test_remedy import make_run

    _, planted = tiny
    # A random model's top-1 flips on noise (its logits are nearly flat): KL is the measure here.
    run, measured = make_run(planted, "{use: fp8-block128, thresholds: {top1_warn: 0, top1_fail: 0}}", tmp_path,
                             dtype="bfloat16")
    assert measured["verdict"] == "fail"
    assert cli.main(["remedy", str(run), "fp8-block128", "--top", "3", "--budget", "1.0"]) == 0
    found = json.loads((run / "fp8-block128" / "remedy.json").read_text())
    first = found["attribution"]["modules"][0]
    assert first["module"] == "model.layers.1.self_attn.q_proj" and first["local_error"] is None  # non-finite
    assert found["attribution"]["drift"]["kl_mean"] is None and first["kl_mean"] < 0.05
    assert found["search"]["kept"] == ["model.layers.1.self_attn.q_proj"]
    assert [v["change"] for v in found["variants"]] == ["64x64 weight blocks", "32x32 weight blocks", "keep 1 module"]
    tried = found["gated"]["tried"]
    assert len(tried) == 1 and tried[0]["verdict"] == "pass" and found["gated"]["chosen"] == 1
    recipe = load_config(run / "fp8-block128" / "remedy.yaml").recipes[0]
    assert list(recipe.weight_block_size) == [64, 64] and recipe.skip == []
    checked = json.loads((run / "fp8-block128" / "remedy" / "1" / "plan.json").read_text())
    assert all(e["status"] == "quantized" for e in checked["modules"] if "layers.1.self_attn" in e["module"])
    made = json.loads((run / "metrics.json").read_text())["recipes"]["fp8-block128"]["quantize"]["real_bytes"]
    assert made < tried[0]["bytes"] <= 1.01 * made
