"""When the base model is the broken one: a non-finite base stops the run once, naming its module; an overflow's
reason names where the huge values came from; a damaged local checkpoint is refused at download, naming the file."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from quantgate import cli
from quantgate.sources import DownloadError
from tasks.download import download
from quantgate.nonfinite import explain_nonfinite, nonfinite_reason
from tests.conftest import edited_copy

PROJECT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("at_once", [1, 2])
def test_a_nonfinite_base_stops_the_run_once_naming_its_module(tiny_llama, tmp_path, prefect_server, at_once):
    """One recipe at a time, the reference runs first and no recipe starts; side by side, the recipes quantize beside
    the reference and stop there, none waiting for ever."""
    def nan_in_v_proj(w):
        w["model.layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")

    base = edited_copy(tiny_llama, tmp_path / "broken-base", nan_in_v_proj)
    runs = tmp_path / "runs"
    overrides = [f"output.runs_dir={runs}", f"output.cache_dir={tmp_path / 'cache'}",
                 f"output.history_db={runs / 'history.sqlite'}", f"model.source={base}", "model.dtype=float32",
                 "recipes=[torchao-int8-weight-only, bnb-nf4]", f"steps.publish.registry_dir={tmp_path / 'registry'}",
                 f"model.recipes_at_once={at_once}"]
    terminal = io.StringIO()
    with contextlib.redirect_stdout(terminal), contextlib.redirect_stderr(terminal):
        code = cli.main(["run", str(PROJECT / "configs" / "default.yaml"), *[a for o in overrides for a in ("--set", o)]])
    shown = terminal.getvalue()
    metrics = json.loads(next(runs.glob("*/metrics.json")).read_text())
    assert code == 1 and metrics["status"] == "failed"
    assert "model.layers.1.self_attn.v_proj" in metrics["base_broken"] and "weight holds NaN" in metrics["base_broken"]
    for entry in metrics["recipes"].values():  # no recipe spent time on a verdict that could mean nothing
        assert entry["status"] == "skipped" and "model.layers.1.self_attn.v_proj" in entry["reason"]
        # Side by side, a quantize (and the generations after it) may have ended before it was known.
        beside = {"quantize", "generate"} if at_once > 1 else set()
        assert all(step["status"] == "not_run" for name, step in entry["steps"].items() if name not in beside)
        assert all(entry["steps"].get(name, {"status": "not_run"})["status"] in ("ok", "not_run") for name in beside)
    assert metrics["reference"]["evaluate"] == {"not_run": "the reference goes non-finite"}
    assert shown.count("the base model is broken: its unquantized") == 1  # said once, under the table


def test_an_fp16_overflow_names_the_module_that_made_the_huge_values(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    with torch.no_grad():  # up_proj's outputs reach ~1e4 (finite); down_proj's sums over them pass 65504
        model.model.layers[0].mlp.up_proj.weight *= 1e5
        model.model.layers[0].mlp.down_proj.weight *= 1e3
    ids = AutoTokenizer.from_pretrained(tiny_llama)("The capital of France is Paris.", return_tensors="pt").input_ids
    found = explain_nonfinite(model, ids)
    assert found["first_nonfinite_module"] == "model.layers.0.mlp.down_proj" and found["input_finite"]
    assert found["produced_by"]["module"] == "model.layers.0.mlp.up_proj"
    assert found["produced_by"]["dtype"] == "torch.float16" and 65504 / 1e3 < found["produced_by"]["max_abs"] <= 65504
    reason = nonfinite_reason(found)
    assert reason.startswith("non-finite output from model.layers.0.mlp.down_proj onward; its input came from "
                             "model.layers.0.mlp.up_proj") and "float16 (limit 6.55e+04): an overflow" in reason


def refused(folder: Path, cache: Path) -> str:
    with pytest.raises(DownloadError) as e:
        download(str(folder), None, str(cache), "float32")
    return str(e.value)


def test_a_truncated_local_checkpoint_is_refused_at_download(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "truncated")
    weights = folder / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    message = refused(folder, tmp_path / "cache")
    assert f"{weights}: truncated: its tensors need" in message


def test_a_local_checkpoint_with_a_corrupted_header_is_refused(tiny_llama, tmp_path):
    folder = shutil.copytree(tiny_llama, tmp_path / "header")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:24] = b"#not json at all"  # the header's first bytes, after its length
    weights.write_bytes(bytes(data))
    assert f"{weights}: the header is not valid JSON" in refused(folder, tmp_path / "cache")


def test_a_local_checkpoint_missing_a_shard_is_refused(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_llama).save_pretrained(folder, max_shard_size="5MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    assert f"{shards[-1]}: missing (named by model.safetensors.index.json)" in refused(folder, tmp_path / "cache")


def test_a_whole_local_checkpoint_is_accepted(tiny_llama, tmp_path):
    result = download(str(tiny_llama), None, str(tmp_path / "cache"), "float32")
    assert result.checkpoint == str(tiny_llama) and len(result.checkpoint_sha256) == 64


def test_an_activation_past_float16_fails_where_float32_computed_it(tiny_llama, tmp_path):
    """A float16 checkpoint validated in float32 on a CPU: its MLP output passes 65,504, which float32 holds and
    float16, where it is served, does not. The scan compares each output with the served dtype's range; the same
    model served in bfloat16 fits."""
    from transformers import AutoTokenizer

    from quantgate import drift, modeling
    from quantgate.backends import ValidateThresholds
    from quantgate.settings import ValidateSettings
    from quantgate.drift import verdict

    def huge_mlp(w):  # every value fits float16; their products do not
        w["model.layers.0.mlp.gate_proj.weight"].fill_(10.0)
        w["model.layers.0.mlp.up_proj.weight"].fill_(10.0)
        w["model.layers.0.mlp.down_proj.weight"].fill_(60000.0)

    folder = edited_copy(tiny_llama, tmp_path / "fp16", huge_mlp)
    model, tokenizer = modeling.load(folder, "float32", "cpu"), AutoTokenizer.from_pretrained(folder)
    settings = ValidateSettings(generate_prompts=0)
    stats = drift.measure_reference(model, tokenizer, settings, served="float16")
    overflow = stats["overflow"]
    assert overflow["module"] == "model.layers.0.mlp.down_proj" and overflow["max_abs"] > 65504
    assert (overflow["dtype"], overflow["computed"], overflow["limit"]) == ("float16", "float32", 65504.0)
    assert stats["nonfinite"] is None  # float32 itself held it: only the served dtype's range tells
    metrics = drift.compare(model, tokenizer, stats, settings, served="float16")
    result, reasons = verdict(metrics, ValidateThresholds())
    assert result == "fail" and reasons[0].startswith("model.layers.0.mlp.down_proj's output reached max |x| ")
    assert "past float16's 6.55e+04: it overflows where the checkpoint is served (computed here in float32)" in reasons[0]
    assert drift.measure_reference(model, tokenizer, settings, served="bfloat16")["overflow"] is None
