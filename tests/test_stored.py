"""The stored-tensor scan (quantgate.stored): what a quantized checkpoint's files hold, read before any forward, on
tiny checkpoints written here and on a real FP8 checkpoint made by the quantize step from the tiny Llama."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantgate import stored
from quantgate.config import load_config
from quantgate.results import ReferenceValidation
from quantgate.settings import ValidateSettings
from tasks import quantize as quantize_step
from tasks import validate as validate_step
from tests.conftest import PROJECT, edited_copy

# Blocks of 32: the tiny Llama's k_proj is 32 rows.
FP8 = load_config(PROJECT / "configs" / "default.yaml",
                  ["recipes=[{use: fp8-block64, name: fp8-block32, weight_block_size: [32, 32]}]"]).recipes[0]


def checkpoint(folder: Path, tensors: dict, block=None) -> Path:
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    config = {"quantization_config": {"quant_method": "fp8", "weight_block_size": block}} if block else {}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def fp8_module(rows=128, cols=128, block=64) -> dict:
    torch.manual_seed(0)
    return {"weight": torch.randn(rows, cols).to(torch.float8_e4m3fn),
            "weight_scale_inv": torch.rand(-(-rows // block), -(-cols // block)) + 0.1}


def findings(folder: Path) -> list[tuple]:
    return [(f["module"], f["tensor"], f["problem"], f["count"]) for f in stored.scan(folder)["findings"]]


def test_a_clean_checkpoint_has_no_findings_and_plain_modules_are_not_read(tmp_path):
    m = fp8_module()
    norm = torch.ones(128)
    norm[0] = float("nan")  # not a quantized module's tensor: the forward's scan names it
    folder = checkpoint(tmp_path / "c", {"model.q.weight": m["weight"], "model.q.weight_scale_inv": m["weight_scale_inv"],
                                         "model.norm.weight": norm}, [64, 64])
    result = stored.scan(folder)
    assert result["scanned"] and result["quantized_modules"] == 1 and result["findings"] == []


def test_each_kind_of_damage_is_named_with_its_module_and_tensor(tmp_path):
    m = fp8_module(rows=192)  # three block rows
    m["weight"][64:128, :64] = 0  # one whole block of zeros
    m["weight"][5, 7] = float("nan")
    scale = torch.rand(128, 1) + 0.1
    scale[3], scale[4] = 0, 1e-40  # zero and subnormal per-row scales (torchao's layout)
    folder = checkpoint(tmp_path / "c", {
        "model.a.weight": m["weight"], "model.a.weight_scale_inv": m["weight_scale_inv"],
        "model.b._weight_qdata": torch.randint(-127, 127, (128, 128), dtype=torch.int8), "model.b._weight_scale": scale,
        "model.c.weight_packed": torch.full((128, 16), 0x11111111, dtype=torch.int32),  # never written
        "model.c.weight_scale": torch.ones(128, 1, dtype=torch.bfloat16)}, [64, 64])
    assert findings(folder) == [("model.a", "weight", "NaN or Inf", 1),
                                ("model.c", "weight_packed", "one value in every word", 2048)]
    result = stored.scan(folder)
    assert stored.finding_reason(result) == (
        "model.a's stored weight: 1 NaN or Inf value, before any forward (and 1 more finding)")
    # Noted, not failed: a pruned base stores these too (tests/test_fp8.py), and the forward judges them.
    assert [(f["module"], f["problem"], f["count"]) for f in result["notes"]] == [
        ("model.a", "all-zero blocks", 1), ("model.b", "zero", 1), ("model.b", "subnormal", 1)]


def test_blocks_at_the_edges_are_counted_whole(tmp_path):
    w = torch.randn(100, 70).to(torch.float8_e4m3fn)  # blocks of 64: the last row and column of blocks are partial
    w[64:, 64:] = 0
    assert stored.zero_blocks(w, [64, 64]) == 1
    w[64:, 64:] = -0.0
    assert stored.zero_blocks(w, [64, 64]) == 1  # negative zero is zero


def test_a_folder_without_safetensors_says_it_was_not_scanned(tmp_path):
    (tmp_path / "qmodel.pt").write_bytes(b"")
    result = stored.scan(tmp_path)
    assert result["scanned"] is False and "no safetensors files in" in result["why"]


def test_validate_fails_a_damaged_fp8_checkpoint_before_loading_it(tiny_llama, tmp_path, monkeypatch):
    """The quantize step's real FP8 checkpoint of the tiny Llama with one stored scale made NaN: validate fails it
    from the files alone, naming the module and the tensor, and never loads the model."""
    quantized = quantize_step.quantize(str(tiny_llama), FP8, "float32", "cpu", str(tmp_path / "q"), 0.0)
    folder = Path(quantized.checkpoint)
    assert stored.scan(folder)["findings"] == []
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.self_attn.q_proj.weight_scale_inv"][0, 0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})

    def never(*args, **kwargs):
        raise AssertionError("validate loaded a checkpoint its files already fail")

    monkeypatch.setattr(validate_step, "load_saved", never)
    reference = ReferenceValidation(path=str(tmp_path / "unread.pt"), cached=False)
    result = validate_step.validate(str(folder), FP8, reference, "cpu", ValidateSettings())
    assert result.verdict == "fail" and result.status == "failed"
    assert result.reason == ("model.layers.1.self_attn.q_proj's stored weight_scale_inv: 1 NaN or Inf value, before "
                             "any forward")
    assert result.record()["stored"]["findings"] == [{"module": "model.layers.1.self_attn.q_proj",
                                                      "tensor": "weight_scale_inv", "problem": "NaN or Inf", "count": 1}]


def test_a_block_the_base_holds_as_zeros_is_recorded_not_failed(tiny_llama, tmp_path):
    """A pruned block stores zeros in any format: the scan notes the count, and fails nothing for it."""
    def pruned(weights):
        weights["model.layers.1.self_attn.q_proj.weight"][:32, :32] = 0

    base = edited_copy(tiny_llama, tmp_path / "pruned", pruned)
    quantized = quantize_step.quantize(str(base), FP8, "float32", "cpu", str(tmp_path / "q"), 0.0)
    result = stored.scan(Path(quantized.checkpoint))
    assert result["findings"] == [] and result["notes"] == [
        {"module": "model.layers.1.self_attn.q_proj", "tensor": "weight", "problem": "all-zero blocks", "count": 1}]
