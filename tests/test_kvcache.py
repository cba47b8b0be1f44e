"""KV-cache capacity on the CPU: the search under a budget that cuts it short, bytes per token by the config
against memory measured, the caches transformers refuses, and the quantized caches' KL on a real model."""
import json

import pytest
import torch

from quantgate import kvcache, modeling
from quantgate.settings import BenchmarkSettings
from quantgate.formats import context_line, kl_line
from quantgate.measure import HostMemory
from quantgate.bench.worker import long_prompt
from tasks.benchmark import benchmark

PER_TOKEN = 8 * 2 * 2 * 64 * 4  # layers x (keys, values) x kv heads x head dim x float32 bytes: 8 KiB
CHUNK = 256


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16384)
    return LlamaForCausalLM(config).eval()


def free_budget(free_mib: int) -> int:
    """A budget of the memory this process holds now plus `free_mib`: the model is loaded, the rest is for the cache."""
    import gc

    gc.collect()  # garbage of the worker's earlier tests, freed during the search, would let it pass the budget
    memory = HostMemory()
    try:
        return memory.held() + free_mib * 2**20
    finally:
        memory.close()


@pytest.mark.integration  # a tiny model, but about 40 s of prefill on the 2-core CPU
def test_the_search_stops_where_the_budget_ends(llama):
    budget = free_budget(48)
    found = kvcache.capacity(llama, budget, ["dynamic", "static", "offloaded"], CHUNK, 16384, 8, 4)
    assert found["bytes_per_token_config"] == PER_TOKEN
    # Measured: the slope of private memory over the chunks agrees with the config.
    assert 0.85 <= found["bytes_per_token_ratio"] <= 1.15, found
    dynamic, static = found["caches"]["dynamic"], found["caches"]["static"]
    # 48 MiB would hold 6,144 tokens of cache alone; each chunk's activations take their share.
    assert 0 < dynamic["context_tokens"] < 48 * 2**20 // PER_TOKEN
    assert dynamic["context_tokens"] % CHUNK == 0 and dynamic["peak"] <= budget
    assert "took the peak" in dynamic["stopped_by"], dynamic
    assert dynamic["decode_ms_per_token"] > 0 and dynamic["decode_tokens"] == 8
    # A static cache is tried at lengths: the next chunk up is the one that did not fit.
    assert static["stopped_by"].startswith(f"a static cache for {static['context_tokens'] + CHUNK:,} tokens"), static
    assert found["caches"]["offloaded"]["status"] == "not_offered"
    roomier = kvcache.capacity(llama, free_budget(96), ["dynamic"], CHUNK, 16384, 8, 4)
    assert roomier["caches"]["dynamic"]["context_tokens"] > dynamic["context_tokens"]


def test_a_budget_the_weights_already_fill_leaves_no_context(llama):
    found = kvcache.capacity(llama, free_budget(0) - 2**20, ["dynamic", "static"], CHUNK, 16384, 8, 4)
    for kind in ("dynamic", "static"):
        assert found["caches"][kind]["context_tokens"] == 0
        assert found["caches"][kind]["stopped_by"].startswith("the loaded model alone takes")


def test_sliding_window_layers_cost_nothing_past_their_window_and_refuse_quantized_caches():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=128,
                              max_position_embeddings=4096)
    # Five sliding layers and one global: past the window only the global layer grows.
    assert kvcache.cache_bytes(config, 2, 10_000) == 2 * 64 * 2 * (10_000 + 5 * 128)
    model = Gemma3ForCausalLM(config).eval()
    found = kvcache.capacity(model, free_budget(64), ["dynamic", "quanto", "fp8"], CHUNK, 4096, 8, 4)
    assert found["caches"]["dynamic"]["context_tokens"] == 4096
    assert found["caches"]["dynamic"]["stopped_by"] == "reached the longest context asked for (4,096 tokens)"
    for kind in ("quanto", "fp8"):
        assert found["caches"][kind]["status"] == "not_offered"
        assert "only full attention layers" in found["caches"][kind]["reason"]


def test_quantized_caches_move_the_next_token_distribution_of_a_real_model_more_with_position(smollm2):
    model = modeling.load(smollm2, "float32", "cpu")
    ids, source = long_prompt(str(smollm2), 1024, model.config.vocab_size, torch.device("cpu"))
    assert ids.shape == (1, 1024) and source.startswith("WikiText-2")
    four = kvcache.quantized_cache_kl(model, ids, ["quanto", "hqq", "fp8"], 128, 4, 0.05)
    two = kvcache.quantized_cache_kl(model, ids, ["quanto", "hqq"], 128, 2, 0.05)
    for kind in ("quanto", "hqq", "fp8"):
        assert four[kind]["status"] == "ok" and 0 < four[kind]["kl_mean"] <= four[kind]["kl_max"], four
        assert [(r["from"], r["to"]) for r in four[kind]["buckets"]] == [(0, 128), (128, 512), (512, 1024)]
    for kind in ("quanto", "hqq"):
        # The first chunk reads nothing from the cache; past it, what it reads was quantized.
        assert two[kind]["buckets"][0]["kl_mean"] < 1e-6 < two[kind]["buckets"][1]["kl_mean"]
        # Two bits per key and value lose more of the distribution than four.
        assert two[kind]["kl_mean"] > four[kind]["kl_mean"] and two[kind]["top1_agreement"] <= four[kind]["top1_agreement"]
        flagged = next(r for r in two[kind]["buckets"] if r["kl_mean"] > 0.05)
        assert two[kind]["flagged"] == f"mean KL {flagged['kl_mean']:.4g} > 0.05 at positions {flagged['from']:,}-{flagged['to']:,}"
    print(json.dumps({"4-bit": four, "2-bit": two}))


@pytest.mark.integration  # a process of its own, a search and a KL: about 20 s on the 2-core CPU
def test_the_benchmark_step_measures_capacity_in_a_process_of_its_own(tiny_llama, tmp_path):
    settings = BenchmarkSettings(prompt_tokens=16, new_tokens=4, repeats=1, timeout_s=600, memory_budget="4GiB",
                                 kv_cache={"caches": ["dynamic", "static", "quanto"], "prefill_chunk": 512,
                                           "max_context": 2048, "kl_prompt_tokens": 600, "kl_chunk": 128})
    result = benchmark("reference", str(tiny_llama), None, "float32", "cpu", settings, str(tmp_path)).model_dump()
    kv = result["kv_cache"]
    assert kv["status"] == "ok", kv
    assert json.loads((tmp_path / "benchmark-kv-cache.json").read_text())["caches"] == kv["caches"]
    assert kv["budget"] == 4 * 2**30 and kv["kl_prompt"] == "WikiText-2 test, its first 600 tokens"
    assert {k: c["context_tokens"] for k, c in kv["caches"].items()} == {"dynamic": 2048, "static": 2048, "quanto": 2048}
    assert kv["kl"]["quanto"]["status"] == "ok"
    line = context_line(kv)
    assert line.startswith("Context that fits in 4 GiB: 2,048 tokens with the dynamic cache (decoding ") and \
        "2,048 tokens with the quanto cache" in line
    assert kl_line(kv).startswith("Quantized caches against the full-precision cache (WikiText-2 test, its first 600")


def test_the_run_record_report_and_card_carry_the_capacity(run_dir):
    """The session's `quantgate run` sets a 4 GiB budget up to 256 tokens: SmolLM2 fits it whole."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    kv = metrics["reference"]["benchmark"]["kv_cache"]
    assert kv["status"] == "ok" and kv["budget"] == 4 * 2**30
    assert {k: c["context_tokens"] for k, c in kv["caches"].items()} == {"dynamic": 256}
    assert metrics["recipes"]["torchao-int8-weight-only"]["benchmark"]["kv_cache"]["status"] == "ok"
    report = (run_dir / "report.md").read_text()
    assert "## KV cache" in report and "| reference | 4 GiB | dynamic | 256 | " in report
    from quantgate.card import render_card

    card = render_card(run_dir, "torchao-int8-weight-only")
    assert "- reference: Context that fits in 4 GiB: 256 tokens with the dynamic cache (decoding " in card
