"""Benchmark step on the CPU: the memory sampler, latency from one run, offloading limits."""
import time

import pytest
import torch

from quantgate import modeling
from quantgate.config import BenchmarkSettings, load_config
from tasks.benchmark import MemorySampler, benchmark, diagnose
from tests.conftest import PROJECT

SMALL = BenchmarkSettings(prompt_tokens=16, new_tokens=6, repeats=2, timeout_s=600)


def recipe(name: str) -> dict:
    config = load_config(PROJECT / "configs" / "default.yaml", [f"recipes=[{name}]"])
    return config.recipes[0].model_dump(mode="json")


def test_sampler_sees_a_planted_private_allocation_during_a_load(smollm2):
    sampler = MemorySampler(interval_ms=2)
    try:
        with sampler.phase("load") as peaks:
            planted = torch.ones(125_000_000, dtype=torch.float32)  # 500 MB, every page touched
            time.sleep(0.05)
            del planted
            model = modeling.load(smollm2, "bfloat16", "cpu")
        with sampler.phase("infer") as quiet:
            time.sleep(0.05)
    finally:
        sampler.close()
    grew = peaks["host_private_peak"] - sampler.baseline["RssAnon"]
    assert grew >= 500_000_000, grew
    # The planted buffer is gone once the load is over: the next phase does not see it.
    assert quiet["host_private_peak"] < peaks["host_private_peak"] - 300_000_000
    assert modeling.real_bytes(model) == 269030272


def test_quantized_too_late_is_diagnosed_on_both_sides():
    gb = 1_000_000_000
    load = {"host_private_peak": 1 * gb, "host_file_peak": 24 * gb, "gpu_peak_allocated": 8 * gb}
    found = diagnose({"load": load}, real_bytes=7 * gb, shard=5 * gb, baseline_private=gb // 2)
    assert not any("too late" in f for f in found) and any("file-backed" in f for f in found)
    load["gpu_peak_allocated"] = 23 * gb  # the bf16 weights reached the GPU first
    found = diagnose({"load": load}, real_bytes=7 * gb, shard=5 * gb, baseline_private=gb // 2)
    assert any(f.startswith("quantized too late: the GPU peak") for f in found)
    load.update(gpu_peak_allocated=None, host_private_peak=20 * gb)
    found = diagnose({"load": load}, real_bytes=7 * gb, shard=5 * gb, baseline_private=gb // 2)
    assert any(f.startswith("quantized too late: host private memory") for f in found)


@pytest.fixture(scope="module")
def measured(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    settings = SMALL.model_dump()
    ref = benchmark("reference", str(smollm2), None, "bfloat16", "cpu", settings, str(out / "reference"))
    int8 = benchmark("torchao-int8-weight-only", str(smollm2), recipe("torchao-int8-weight-only"), "bfloat16", "cpu",
                     settings, str(out / "int8"), reference=ref)
    return ref, int8


def test_reference_and_recipe_latency_from_one_run(measured):
    ref, int8 = measured
    assert ref["status"] == int8["status"] == "ok", (ref.get("reason"), int8.get("reason"))
    for result in (ref, int8):
        lat = result["latency"]
        assert lat["path"] == "eager" and lat["runs"][0]["fallback_reason"].startswith("CPU")
        assert len(lat["runs"][0]["decode_ms_all"]) == SMALL.repeats
        assert 0 < lat["prefill_ms"] and 0 < lat["decode_ms_per_token"] < lat["total_s"] * 1000
        assert lat["tokens_per_s"] == pytest.approx(1000 / lat["decode_ms_per_token"], rel=1e-3)
        # A decode step reads every weight at least once: it cannot beat the bandwidth floor.
        assert lat["of_bandwidth_floor"] > 1
        mem = result["memory"]
        assert mem["host_private_peak"] >= mem["host_private_baseline"] > 0 and mem["host_file_peak"] > 0
        assert mem["gpu_peak_load"] is None and mem["gpu_peak_infer"] is None  # no GPU here: not measured
    # The recipe reuses the run's copy bandwidth and compares itself with the reference measured before it.
    assert int8["copy_bandwidth"] == ref["copy_bandwidth"]
    assert int8["latency"]["speedup_vs_reference"] == pytest.approx(
        ref["latency"]["decode_ms_per_token"] / int8["latency"]["decode_ms_per_token"], abs=1e-3)
    assert int8["real_bytes"] < ref["real_bytes"] and int8["weight_bytes_per_token"] < ref["weight_bytes_per_token"]


def test_offloading_limits(smollm2, tmp_path):
    settings = SMALL.model_copy(update={"max_memory": {"cpu": "120MB"}, "offload_to_disk": True,
                                        "new_tokens": 3, "repeats": 1}).model_dump()
    ref = benchmark("reference", str(smollm2), None, "bfloat16", "cpu", settings, str(tmp_path / "ref"))
    assert ref["status"] == "ok", ref.get("reason")
    assert ref["placement"]["hf_device_map_present"] and ref["placement"]["modules_by_device"]["disk"] > 0
    assert ref["latency"]["decode_ms_per_token"] > 0
    assert not (tmp_path / "ref" / "offload").exists()  # the offloaded weights are cleaned up
    # bitsandbytes refuses to put quantized modules on the CPU or disk: an error with the limit, not a crash.
    nf4 = benchmark("bnb-nf4", str(smollm2), recipe("bnb-nf4"), "bfloat16", "cpu", settings, str(tmp_path / "nf4"))
    assert nf4["status"] == "error"
    assert "ValueError: Some modules are dispatched on the CPU or the disk" in nf4["reason"]
    assert "'max_memory': {'cpu': '120MB'}" in nf4["reason"]


@pytest.mark.parametrize("layer_types", [["full_attention"] * 2, ["sliding_attention", "full_attention"]])
def test_static_cache_decoding_matches_eager(layer_types):
    """The GPU fast path's decode step (static cache, every layer full length, sliding windows masked
    by position) predicts the same tokens as plain decoding, here past a sliding window of 8."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tasks.benchmark import StaticDecoder, decode_eager, prompt_ids

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=layer_types, max_position_embeddings=128)
    model = Gemma3ForCausalLM(config).eval()
    ids = prompt_ids(512, 2, 12, torch.device("cpu"))
    _, _, eager = decode_eager(model, ids, 10)
    _, _, static = StaticDecoder(model, batch=2, max_len=22, graph=False).run(ids, 10)
    assert torch.equal(static, eager)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_graph_decoding_matches_eager(compiled):
    """On a GPU the decode step is captured once and replayed per token; it must keep decoding the
    same tokens as eager decoding (a graph that froze the position would repeat itself)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tasks.benchmark import StaticDecoder, decode_eager, prompt_ids

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
    model = Gemma3ForCausalLM(config).cuda().eval()
    ids = prompt_ids(512, 2, 12, torch.device("cuda"))
    _, _, eager = decode_eager(model, ids, 10)
    decoder = StaticDecoder(model, batch=2, max_len=22, compiled=compiled)
    assert decoder.graph is not None
    _, _, replayed = decoder.run(ids, 10)
    # Compiled kernels may round differently and flip a late near-tie; the prefill's token and most
    # of the rest must match.
    agreement = (replayed == eager).float().mean().item()
    assert torch.equal(replayed, eager) if not compiled else (agreement >= 0.8 and torch.equal(replayed[:, :2], eager[:, :2]))
