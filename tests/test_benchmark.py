"""Benchmark step on the CPU: the memory sampler, latency from one run, offloading limits."""
import functools
import json
import logging
import os
import subprocess
import sys
import time
import types
import weakref
from datetime import datetime
from pathlib import Path

import pytest
import torch

from quantgate import modeling
from quantgate.config import load_config
from quantgate.backends import BACKENDS
from quantgate.bench.decode import StaticDecoder, decode_eager, prompt_ids
from quantgate.bench.fusion import fuse_projections
from quantgate.bench.worker import diagnose
from quantgate.measure import MemorySampler
from quantgate.settings import BenchmarkSettings
from tasks.benchmark import benchmark
from tests.conftest import PROJECT

SMALL = BenchmarkSettings(prompt_tokens=16, new_tokens=6, repeats=2, timeout_s=600)


def recipe(name: str):
    return load_config(PROJECT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]


def saved(smollm2, name: str, out: Path) -> str:
    """The recipe's checkpoint as the quantize step saves it: what the benchmark measures."""
    from tasks.quantize import quantize

    result = quantize(str(smollm2), recipe(name), "bfloat16", "cpu", str(out / name), roundtrip_min_top1=0.9)
    assert result.status == "ok", result.reason
    return result.checkpoint


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


def test_a_process_knows_how_long_ago_it_began():
    # A fresh interpreter that sleeps before asking: its age counts the sleep and the interpreter's start before it.
    code = "import time; time.sleep(0.5); from quantgate.measure import process_age_s; print(process_age_s())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               cwd=PROJECT).stdout)
    assert age >= 0.5 - 0.01  # /proc counts in ticks of 10 ms


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


def test_quantize_on_load_runs_beside_only_where_both_models_fit(tmp_path, monkeypatch):
    """Both quantized models and the largest shard the reference loads through, with the plan's spare, and each
    process's own, against the device's free memory; never beside under memory limits or over several GPUs."""
    import psutil

    from quantgate.plan import MEMORY_SPARE
    from tasks.benchmark import PROCESS_BYTES, room_beside

    saved_dir, base = tmp_path / "saved", tmp_path / "base"
    for folder, shards in ((saved_dir, [300]), (base, [500, 700])):
        folder.mkdir()
        for i, size in enumerate(shards):
            (folder / f"model-{i}.safetensors").write_bytes(b"\0" * size)
    needed = MEMORY_SPARE * (2 * 300 + 700) + 2 * PROCESS_BYTES
    available = lambda n: lambda: types.SimpleNamespace(available=n)  # noqa: E731
    monkeypatch.setattr(psutil, "virtual_memory", available(needed + 1))
    assert room_beside(str(saved_dir), str(base), "cpu", SMALL)
    assert not room_beside(str(saved_dir), str(base), "cpu", SMALL.model_copy(update={"max_memory": {"cpu": "1GB"}}))
    assert not room_beside(str(saved_dir), str(base), {"device_map": "auto", "max_memory": {"0": "1GB"}}, SMALL)
    monkeypatch.setattr(psutil, "virtual_memory", available(needed - 1))
    assert not room_beside(str(saved_dir), str(base), "cpu", SMALL)


@pytest.fixture(scope="module")
def measured(smollm2, tmp_path_factory):
    import contextlib

    out = tmp_path_factory.mktemp("bench")
    ref = benchmark("reference", str(smollm2), None, "bfloat16", "cpu", SMALL, str(out / "reference"))
    turns = []

    @contextlib.contextmanager
    def alone():  # as the flow's turn: what the measurement's log said when it was asked for, and when given back
        turns.append({"asked_after": (out / "int8" / "benchmark-log.txt").read_text(),
                      "on_load_ended": (out / "int8" / "benchmark-quantize-on-load.json").is_file()})
        yield
        turns[-1]["given_back"] = time.time()

    int8 = benchmark("torchao-int8-weight-only", saved(smollm2, "torchao-int8-weight-only", out),
                     recipe("torchao-int8-weight-only"), "bfloat16", "cpu", SMALL, str(out / "int8"), reference=ref,
                     base_checkpoint=str(smollm2), alone=alone)
    return ref.model_dump(), {**int8.model_dump(), "turns": turns}


def test_reference_and_recipe_latency_from_one_run(measured):
    ref, int8 = measured
    assert ref["status"] == int8["status"] == "ok", (ref.get("reason"), int8.get("reason"))
    for result in (ref, int8):
        lat = result["latency"]
        assert lat["path"] == "eager" and lat["runs"][0]["fallback_reason"].startswith("CPU")
        assert len(lat["runs"][0]["decode_ms_all"]) == SMALL.repeats
        assert 0 < lat["prefill_ms"] and 0 < lat["decode_ms_per_token"] < lat["total_s"] * 1000
        # Recorded to two decimals (3.76 on a slow host, where rel=1e-3 allows 0.004): the rounding's half step 0.005,
        # and what decode_ms_per_token's own rounding (4 decimals, 5e-5 ms) moves 1000/ms by.
        ms = lat["decode_ms_per_token"]
        assert lat["tokens_per_s"] == pytest.approx(1000 / ms, abs=0.005 + 0.05 / ms ** 2 + 1e-9)
        # A decode step reads every weight at least once: it cannot beat the bandwidth floor.
        assert lat["of_bandwidth_floor"] > 1
        mem = result["memory"]
        assert mem["host_private_peak"] >= mem["host_private_baseline"] > 0 and mem["host_file_peak"] > 0
        assert mem["gpu_peak_load"] is None and mem["gpu_peak_infer"] is None  # no GPU here: not measured
    # The recipe reuses the run's copy bandwidth and compares itself with the reference measured before it.
    assert int8["copy_bandwidth"] == ref["copy_bandwidth"]
    # The record rounds each decode time to 0.01 ms and the speedup is taken before: a few ms a token on a CPU.
    assert int8["latency"]["speedup_vs_reference"] == pytest.approx(
        ref["latency"]["decode_ms_per_token"] / int8["latency"]["decode_ms_per_token"], rel=0.01)
    assert int8["real_bytes"] < ref["real_bytes"] and int8["weight_bytes_per_token"] < ref["weight_bytes_per_token"]


def test_a_benchmark_measured_before_the_references_ended_is_compared_after(tiny_llama, tmp_path):
    """In a flow, a recipe's benchmark may start while the reference's runs: it measures its own copy bandwidth for its
    floor, and the comparison is added once both have ended (a step waiting for the reference while it holds a share
    of the device would keep the reference's benchmark from ever being alone)."""
    from tasks.benchmark import compared

    first = benchmark("reference", str(tiny_llama), None, "bfloat16", "cpu", SMALL, str(tmp_path / "first"))
    alone = benchmark("again", str(tiny_llama), None, "bfloat16", "cpu", SMALL, str(tmp_path / "second"))
    assert first.status == alone.status == "ok", (first.reason, alone.reason)
    assert "speedup_vs_reference" not in alone.latency
    assert alone.copy_bandwidth > 0 and alone.copy_bandwidth != first.copy_bandwidth  # its own, none given
    later = compared(alone, first)
    assert later.latency["speedup_vs_reference"] == pytest.approx(
        first.latency["decode_ms_per_token"] / alone.latency["decode_ms_per_token"], rel=0.01)
    assert later.copy_bandwidth == alone.copy_bandwidth and later.warnings == alone.warnings
    assert later.model_fields_set == alone.model_fields_set and "speedup_vs_reference" not in alone.latency
    assert compared(alone, None) is alone


def test_the_benchmark_loads_the_saved_checkpoint_and_keeps_quantize_on_load_apart(measured, smollm2):
    ref, int8 = measured
    # Inference figures come from what ships: the recipe's own checkpoint folder.
    assert int8["loaded"].endswith("torchao-int8-weight-only/checkpoint") and ref["loaded"] == str(smollm2)
    spec = json.loads((Path(int8["loaded"]).parents[1] / "int8" / "benchmark-spec.json").read_text())
    assert spec["mode"] == "saved" and spec["checkpoint"] == int8["loaded"]
    # The reference quantized while loading: measured in its own process, labelled, with no latency.
    on_load = int8["quantize_on_load"]
    assert on_load["status"] == "ok" and "latency" not in on_load
    assert on_load["memory"]["host_private_peak"] > 0 and on_load["real_bytes"] == int8["real_bytes"]
    assert int8["memory"]["host_private_peak"] != on_load["memory"]["host_private_peak"]


def test_the_benchmark_loads_sharing_the_device_and_times_with_it_alone(measured):
    """Given a turn (the flow's Hold.alone), the measurement asks for it once loaded and warmed up, before anything
    is timed, and gives it back when it ends; the memory of quantizing while loading times nothing and asks for none:
    it runs beside the load, and has ended before the turn is taken."""
    _, int8 = measured
    [turn] = int8["turns"]
    assert "benchmark: loaded in" in turn["asked_after"] and "repeat 1/" not in turn["asked_after"]
    assert turn["on_load_ended"]
    folder = Path(int8["loaded"]).parents[1] / "int8"
    # Started before the measurement said it was ready to time (its turn's first file): beside its load.
    assert (folder / "benchmark-quantize-on-load-spec.json").stat().st_mtime < (folder / "benchmark-ready").stat().st_mtime
    alone = int8["alone"]
    assert alone["waited_s"] >= 0 and alone["seconds"] > 0 and "alone" not in int8["quantize_on_load"]
    started = datetime.fromisoformat(alone["started_at"]).timestamp()
    assert started <= turn["given_back"] <= started + alone["seconds"] + 1


def test_a_decode_step_reads_a_quantized_head_and_not_the_embedding_beside_it():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantgate.bench.latency import weight_bytes_per_token

    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    tied = modeling.real_bytes(model)
    assert weight_bytes_per_token(model, tied) == tied  # the tied head reads the embedding whole
    head = modeling.untie_output_embedding(model)
    assert not model.config.tie_word_embeddings and head.weight is not model.get_input_embeddings().weight
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, _: module is head)
    embedding = 4096 * 64 * 4  # float32, only indexed
    assert weight_bytes_per_token(model, modeling.real_bytes(model)) == modeling.real_bytes(model) - embedding
    assert modeling.real_bytes(model) - tied < 4096 * 64 * 1.1  # int8 head and its scales


def test_offloading_limits(smollm2, tmp_path):
    settings = SMALL.model_copy(update={"max_memory": {"cpu": "120MB"}, "offload_to_disk": True,
                                        "new_tokens": 3, "repeats": 1})
    ref = benchmark("reference", str(smollm2), None, "bfloat16", "cpu", settings, str(tmp_path / "ref")).model_dump()
    assert ref["status"] == "ok", ref.get("reason")
    assert ref["placement"]["hf_device_map_present"] and ref["placement"]["modules_by_device"]["disk"] > 0
    assert ref["latency"]["decode_ms_per_token"] > 0
    assert not list((tmp_path / "ref").glob("offload*"))  # the offloaded weights are cleaned up
    # bitsandbytes refuses to put quantized modules on the CPU or disk: an error with the limit, not a crash.
    nf4 = benchmark("bnb-nf4", saved(smollm2, "bnb-nf4", tmp_path), recipe("bnb-nf4"), "bfloat16", "cpu", settings,
                    str(tmp_path / "nf4"), base_checkpoint=str(smollm2)).model_dump()
    assert nf4["status"] == "error"
    assert "ValueError: Some modules are dispatched on the CPU or the disk" in nf4["reason"]
    assert "'max_memory': {'cpu': '120MB'}" in nf4["reason"]


def tiny_gemma3(layer_types=("sliding_attention", "full_attention")):
    """A Gemma 3 of a few layers, sliding window 8, random weights (seeded)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              layer_types=list(layer_types), max_position_embeddings=128)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("layer_types", [["full_attention"] * 2, ["sliding_attention", "full_attention"]])
def test_static_cache_decoding_matches_eager(layer_types):
    """The GPU fast path's decode step (static cache, every layer full length, sliding windows masked
    by position) predicts the same tokens as plain decoding, here past a sliding window of 8."""

    model = tiny_gemma3(layer_types)
    ids = prompt_ids(512, 2, 12, torch.device("cpu"))
    _, _, eager = decode_eager(model, ids, 10)
    _, _, static = StaticDecoder(model, batch=2, max_len=22, graph=False).run(ids, 10)
    assert torch.equal(static, eager)


def tiny_gemma4_text(layers: int = 8):
    """A Gemma 4 text model whose last half reads the first half's keys and values (KV sharing)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    torch.manual_seed(0)
    config = Gemma4TextConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                              max_position_embeddings=128, sliding_window=8, hidden_size_per_layer_input=16,
                              vocab_size_per_layer_input=512, num_kv_shared_layers=layers // 2,
                              layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    return Gemma4ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: tiny_gemma3(["sliding_attention", "full_attention"] * 3), tiny_gemma4_text],
                         ids=["gemma3", "gemma4-kv-shared"])
def test_layers_compiled_one_at_a_time_share_a_graph_and_decode_as_eager(make):
    """compile_scope layers: layers of several types, each with its own part of the cache, go through one
    compiled function in fewer graphs than there are layers, and decode the eager tokens; the prefill stays
    eager and the layers' own forwards come back after each step."""
    from torch._dynamo.utils import counters


    model = make()
    ids = prompt_ids(512, 2, 12, torch.device("cpu"))
    _, _, eager = decode_eager(model, ids, 10)
    torch._dynamo.reset()
    counters.clear()
    decoder = StaticDecoder(model, batch=2, max_len=22, compiled=True, graph=False, compile_scope="layers")
    _, _, compiled = decoder.run(ids, 10)
    assert torch.equal(compiled, eager)
    assert 1 <= counters["stats"]["unique_graphs"] < len(model.model.layers)
    assert all("forward" not in vars(layer) for layer in model.model.layers)


def test_layers_with_a_wrapped_forward_are_not_compiled_one_at_a_time():
    """A layer whose forward is wrapped on the instance (as accelerate's hooks do) is refused by layers, which would
    bypass the wrapper; the benchmark then compiles the whole step."""

    model = tiny_gemma3()
    layer = model.model.layers[0]
    layer.forward = functools.partial(type(layer).forward, layer)
    with pytest.raises(TypeError, match="forward is wrapped"):
        StaticDecoder(model, batch=1, max_len=8, compiled=True, graph=False, compile_scope="layers")
    assert "forward" in vars(layer)


@pytest.mark.gpu
@pytest.mark.parametrize("scope", [None, "layers", "model"])
def test_cuda_graph_decoding_matches_eager(scope):
    """On a GPU the decode step is captured once and replayed per token; it must keep decoding the
    same tokens as eager decoding (a graph that froze the position would repeat itself)."""

    model = tiny_gemma3().cuda()
    ids = prompt_ids(512, 2, 12, torch.device("cuda"))
    _, _, eager = decode_eager(model, ids, 10)
    compiled = scope is not None
    decoder = StaticDecoder(model, batch=2, max_len=22, compiled=compiled, compile_scope=scope)
    assert decoder.graph is not None
    _, _, replayed = decoder.run(ids, 10)
    # Compiled kernels may round differently and flip a late near-tie; the prefill's token and most
    # of the rest must match.
    agreement = (replayed == eager).float().mean().item()
    assert torch.equal(replayed, eager) if not compiled else (agreement >= 0.8 and torch.equal(replayed[:, :2], eager[:, :2]))


def test_fused_projections_compute_what_the_separate_ones_did(monkeypatch):

    model = tiny_gemma3()
    ids = prompt_ids(512, 2, 12, torch.device("cpu"))
    with torch.no_grad():
        before = model(ids).logits
    _, _, eager = decode_eager(model, ids, 10)
    k_proj = model.model.layers[0].self_attn.k_proj
    k_proj.extra_repr = types.MethodType(lambda self: "quantized", k_proj)
    replaced = weakref.ref(k_proj)
    del k_proj
    # Layer 0's replaced projection, though it refers to itself (as torchao's do), is gone before
    # layer 1 is fused: else the peak holds every layer's replaced weights at once.
    from quantgate.bench import fusion

    alive_while_fusing, stack = [], fusion.fused_matmul

    def stack_and_look(weights, bias, backend=None):
        alive_while_fusing.append(replaced() is not None)
        return stack(weights, bias, backend)

    monkeypatch.setattr(fusion, "fused_matmul", stack_and_look)
    assert fuse_projections(model) == {"fused": {"q_proj+k_proj+v_proj": 2, "gate_proj+up_proj": 2}, "unfused": {},
                                         "padding_bytes_dropped": 0}
    assert not any(hasattr(layer.self_attn.q_proj, "weight") for layer in model.model.layers)
    assert alive_while_fusing == [True, False, False, False]  # layer 0's q/k/v, then its MLP, layer 1's
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    _, _, static = StaticDecoder(model, batch=2, max_len=22, graph=False).run(ids, 10)
    assert torch.equal(static, eager)


def test_compiled_fused_group_is_one_matmul():
    """torch.compile traces the siblings' shared call once: q, k and v cost one matmul, with no
    recompilation from one call to the next."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code


    attention = tiny_gemma3(["sliding_attention"]).model.layers[0].self_attn
    fuse_projections(attention)
    project = torch.compile(lambda x: attention.q_proj(x) + attention.k_proj(x).repeat(1, 1, 2)
                            + attention.v_proj(x).repeat(1, 1, 2), fullgraph=True)
    x = torch.randn(1, 3, 64)
    weights = attention.q_proj.fused.matmul.weight.split([64, 32, 32])
    expected = x @ weights[0].T + (x @ weights[1].T).repeat(1, 1, 2) + (x @ weights[2].T).repeat(1, 1, 2)
    torch._dynamo.reset()
    with torch.no_grad():
        out, code = run_and_get_code(project, x)
        graphs = counters["stats"]["unique_graphs"]
        project(torch.randn(1, 3, 64))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sum(c.count("extern_kernels.mm(") for c in code) == 1
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.gpu
def test_fused_tinygemm_int4_weights_match_the_separate_ones():
    """torchao's int4 (tinygemm layout) weights stack along the output rows: the fused matmul gives
    the separate projections' outputs bit for bit."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_


    attention = tiny_gemma3(["sliding_attention"]).model.layers[0].self_attn.to("cuda", torch.bfloat16)
    quantize_(attention, Int4WeightOnlyConfig(group_size=32, int4_packing_format="tile_packed_to_4d"))
    x = torch.randn(1, 3, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        separate = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
        assert fuse_projections(attention, BACKENDS["torchao"])["fused"] == {"q_proj+k_proj+v_proj": 1}
        fused = [attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)]
    for a, b in zip(fused, separate):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_fused_tinygemm_int4_drops_torchao_k_padding():
    """torchao pads in_features to a multiple of 1024; fused, the padding's k-tiles are dropped and
    the matmul runs on the true 384 columns with the same result."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_


    mlp = torch.nn.Module()
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(384, 256, bias=False), torch.nn.Linear(384, 256, bias=False)
    mlp.to("cuda", torch.bfloat16)
    quantize_(mlp, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    assert mlp.gate_proj.weight.qdata.shape[1] == 1024 // 128  # torchao's padded k-tiles
    x = torch.randn(1, 1, 384, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        separate = [mlp.gate_proj(x), mlp.up_proj(x)]
        fusion = fuse_projections(mlp, BACKENDS["torchao"])
        fused = [mlp.gate_proj(x), mlp.up_proj(x)]
    assert fusion["fused"] == {"gate_proj+up_proj": 1}
    assert mlp.gate_proj.fused.matmul.qdata.shape[1] == 3
    # 512 rows lose 640 columns of 4-bit values and 5 groups of a bf16 scale and zero each.
    assert fusion["padding_bytes_dropped"] == 512 * 640 // 2 + 512 * 5 * 4
    # The dropped bytes are freed, not kept alive behind a view: each buffer owns exactly its bytes.
    fused_weights = mlp.gate_proj.fused.matmul
    assert all(t.untyped_storage().nbytes() == t.nbytes for t in (fused_weights.qdata, fused_weights.scale_and_zero))
    for a, b in zip(fused, separate):
        # tinygemm splits k across its warps differently for 3 k-tiles than for 8: fp32 sums reorder.
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-2)


def test_the_wait_for_the_device_alone_is_not_timed_out(tmp_path):
    """A measurement ready to time waits for its turn as long as other steps hold it; timeout_s counts from its go."""
    import subprocess
    import sys

    from quantgate.bench.launcher import waited

    ready, go = tmp_path / "ready", tmp_path / "go"
    script = (f"import pathlib, time; pathlib.Path({str(ready)!r}).touch()\n"
              f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.02)\ntime.sleep(0.3)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    assert waited(proc, 1.0, (ready, go), lambda: time.sleep(2.0)) == 0  # the turn came after twice the timeout
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waited(stuck, 1.0, (ready.with_name("never"), go.with_name("never-go")), lambda: None)
    finally:
        stuck.kill()
        stuck.wait()


def test_several_measurement_processes_give_the_median_and_their_spread(smollm2, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="quantgate.benchmark")
    settings = SMALL.model_copy(update={"processes": 3})
    result = benchmark("reference", str(smollm2), None, "bfloat16", "cpu", settings, str(tmp_path),
                       cache_dir=str(tmp_path / "cache")).model_dump()
    assert result["status"] == "ok", result.get("reason")
    # Each process compiles into the run's cache folder, where the next run finds the kernels.
    assert result["inductor_cache"] == str(tmp_path / "cache" / "inductor")
    lat = result["latency"]
    figures = lat["decode_ms_by_process"]
    assert len(figures) == 3 and figures == sorted(figures) and lat["decode_ms_per_token"] == figures[1]
    assert lat["decode_spread_over"] == "processes" and result["process"] == "fresh"  # never forked siblings
    assert lat["decode_spread"] == pytest.approx((figures[2] - figures[0]) / figures[1], abs=1e-4)
    assert sorted(p.name for p in tmp_path.glob("benchmark-process?.json")) == [
        "benchmark-process1.json", "benchmark-process2.json", "benchmark-process3.json"]
    assert json.loads((tmp_path / "benchmark.json").read_text())["latency"] == lat
    # Each process's account of where its time went reaches the step's log (the run's run.log).
    assert sum(r.getMessage().startswith("reference: benchmark: loaded in") for r in caplog.records) == 3


def test_a_timing_that_shared_its_machine_says_so():
    """Another process spinning a core while a measurement runs: others_busy sees about one core busy."""
    import subprocess
    import sys

    from quantgate.measure import BUSY_CORES, others_busy

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # started and spinning
        result, others = others_busy(lambda: time.sleep(2) or "measured")
    finally:
        spinner.kill()
        spinner.wait()
    assert result == "measured" and BUSY_CORES < others <= os.cpu_count() + 0.1, others


def test_eager_choices_along_a_generation_are_eager_decoding_s_own_tokens():
    """One forward over the prompt and a greedy generation picks, at each position, the token that decoding it one
    step at a time picked: the check reads eager decoding's choices without decoding eagerly."""
    from quantgate.bench.decode import eager_choices

    model = tiny_gemma3()  # past its sliding window of 8
    ids = prompt_ids(512, 2, 12, torch.device("cpu"))
    _, _, tokens = decode_eager(model, ids, 40)
    assert torch.equal(eager_choices(model, ids, tokens), tokens)

    class EveryLogit(torch.nn.Module):  # a forward that takes logits_to_keep and returns every position's anyway
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, logits_to_keep=0, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)

    assert torch.equal(eager_choices(EveryLogit(), ids, tokens), tokens)


def test_the_shipped_decode_path_is_checked_over_the_whole_generation(monkeypatch):
    """A decode path that agrees with eager decoding for its first 20 tokens and then goes wrong (output right eagerly
    and wrong only under the graph, vLLM #46329): found at token 20, which a check of the first 16 missed; eager's
    choice given the wrong tokens before it is none of them."""
    from quantgate.bench import latency

    model = tiny_gemma3()
    ids = prompt_ids(512, 1, 12, torch.device("cpu"))

    class WrongLate:  # stands in for the captured decoder: eager's tokens, then a constant one from token 20
        def __init__(self, *args, **kwargs):
            self.compile_s = 0.0

        def run(self, prompt, n):
            prefill, decode, tokens = decode_eager(model, prompt, n)
            tokens[:, 20:] = (tokens[:, 20:] + 1) % 512
            return prefill, decode, tokens

    monkeypatch.setattr(latency, "StaticDecoder", WrongLate)
    decoding = latency.fast_path(model, ids, BenchmarkSettings(prompt_tokens=12, new_tokens=40), "")
    assert decoding.divergence == 20 and decoding.agreement == pytest.approx(20 / 40)
    timed = latency.timed_runs(decoding, ids, BenchmarkSettings(prompt_tokens=12, new_tokens=40, repeats=1))
    assert timed["first_divergence_from_eager"] == 20 and timed["greedy_agreement_with_eager"] == 0.5


def test_a_measurement_beside_a_step_that_stops_is_killed_not_waited_for():
    """A step that stops (Ctrl-C, an error) leaves no measurement beside it running to its timeout."""
    import subprocess
    import threading

    from quantgate.bench.launcher import Cancelled, waited

    proc, cancel = subprocess.Popen(["sleep", "60"]), threading.Event()
    threading.Timer(0.3, cancel.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            waited(proc, 600, None, None, cancel)
    finally:
        proc.kill()
        proc.wait()
    assert time.monotonic() - t0 < 5
