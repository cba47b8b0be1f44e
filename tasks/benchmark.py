"""Benchmark step: memory and latency of the reference and of each recipe's saved checkpoint (what
ships), each in a fresh process; for a recipe whose library quantizes while loading, also the memory of
loading the reference checkpoint quantized on the fly (the "load a bf16 checkpoint in 4-bit" case).

Memory is sampled while the model loads (and quantizes) and while it generates: host private
memory (RssAnon) and file-backed pages (RssFile, the memory-mapped checkpoint) apart, because a
4-bit load that "spikes RAM to 24 GB" is usually mapped file pages, not a private copy; GPU peaks
allocated and reserved; the real bytes of the weights. Latency is batch 1, 256 prompt tokens and
256 new ones by default: prefill, then greedy decode. On a GPU the decode step runs from a static
KV cache, compiled and captured in a CUDA graph, with plain eager decoding as a labelled fallback;
each figure is also read against the bandwidth floor (weight bytes read per token over the
device's copy bandwidth, measured once a run).

`benchmark()` (the Prefect task) runs `python -m tasks.benchmark SPEC OUT` and reads its result.
"""
from __future__ import annotations

import copy
import functools
import gc
import importlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path

import torch
from prefect import task

from quantgate import kvcache, modeling
from quantgate.backends import backend_of, parse_recipe
from quantgate.config import DATA_DIR
from quantgate.files import WEIGHT_FILES, write_json
from quantgate.measure import Timer, proc_status
from quantgate.plan import kept, plan_recipe
from tasks.quantize import cuda_skip, growth, kernel_of, quantize_model

log = logging.getLogger("quantgate.benchmark")


# ---------------------------------------------------------------- memory

class MemorySampler:
    """Samples host private (RssAnon) and file-backed (RssFile) memory every few milliseconds
    in a thread, and GPU peaks per phase; `with sampler.phase("load"): ...` labels the samples."""

    def __init__(self, interval_ms: float = 5.0):
        self.interval = interval_ms / 1000
        self.baseline = proc_status()
        self.peaks: dict[str, dict[str, int | None]] = {}
        self._current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        current = self._current  # read once: the main thread may end the phase meanwhile
        if current is None:
            return
        status = proc_status()
        peak = self.peaks[current]
        peak["host_private_peak"] = max(peak["host_private_peak"], status["RssAnon"])
        peak["host_file_peak"] = max(peak["host_file_peak"], status["RssFile"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @contextmanager
    def phase(self, name: str):
        self.peaks[name] = {"host_private_peak": 0, "host_file_peak": 0, "gpu_peak_allocated": None,
                            "gpu_peak_reserved": None}
        if torch.cuda.is_available():
            for gpu in range(torch.cuda.device_count()):
                torch.cuda.synchronize(gpu)
                torch.cuda.reset_peak_memory_stats(gpu)
        self._current = name
        self._sample()
        try:
            yield self.peaks[name]
        finally:
            self._sample()
            self._current = None
            if torch.cuda.is_available():
                gpus = range(torch.cuda.device_count())
                for gpu in gpus:
                    torch.cuda.synchronize(gpu)
                # Each GPU's own peak; the headline figures are their sum (one GPU: its peak, as before).
                allocated = {gpu: torch.cuda.max_memory_allocated(gpu) for gpu in gpus}
                self.peaks[name].update(gpu_peak_allocated=sum(allocated.values()),
                                        gpu_peak_reserved=sum(torch.cuda.max_memory_reserved(g) for g in gpus),
                                        **({"gpu_peak_allocated_by_device": allocated} if len(allocated) > 1 else {}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def largest_shard(checkpoint: Path) -> int:
    return max((p.stat().st_size for pattern in WEIGHT_FILES for p in Path(checkpoint).glob(pattern)), default=0)


def diagnose(memory: dict, real_bytes: int, shard: int, baseline_private: int) -> list[str]:
    """Plain-language findings about a load; empty when nothing is off."""
    found = []
    bound = real_bytes + shard
    load = memory["load"]
    private = load["host_private_peak"] - baseline_private
    if private > bound:
        found.append(f"quantized too late: host private memory grew {private / 1e9:.2f} GB during the load, more than "
                     f"the final weights ({real_bytes / 1e9:.2f} GB) plus the largest shard ({shard / 1e9:.2f} GB): "
                     f"a full-precision copy was held in RAM")
    if load["gpu_peak_allocated"] is not None and load["gpu_peak_allocated"] > bound:
        found.append(f"quantized too late: the GPU peak during the load ({load['gpu_peak_allocated'] / 1e9:.2f} GB) "
                     f"exceeds the final weights ({real_bytes / 1e9:.2f} GB) plus the largest shard "
                     f"({shard / 1e9:.2f} GB): the weights reached the GPU before they were quantized")
    if load["host_file_peak"] > 2 * max(load["host_private_peak"], 1):
        found.append(f"the host peak is mostly file-backed: {load['host_file_peak'] / 1e9:.2f} GB of memory-mapped "
                     f"checkpoint pages (the kernel drops them under pressure) against "
                     f"{load['host_private_peak'] / 1e9:.2f} GB private")
    return found


# ---------------------------------------------------------------- latency

def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Bytes per second of a large device copy, counting bytes read plus bytes written."""
    n = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.ms)
    del src, dst
    return 2 * n / (statistics.median(times) / 1000)


def weight_bytes_per_token(model: torch.nn.Module, real_bytes: int) -> int:
    """Weight bytes a decode step reads: all of them, less an input embedding that is only indexed
    (a tied output head reads it whole, and real_bytes counts shared storage once)."""
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is not None and out.weight.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr():
        return real_bytes
    return real_bytes - emb.numel() * emb.element_size()


def prompt_ids(vocab_size: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


@torch.no_grad()
def decode_eager(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """Prefill ms, decode ms per token and the greedy tokens, with a dynamic KV cache."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    with Timer(device) as prefill:
        token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    tokens = [token]
    with Timer(device) as decode:
        for _ in range(new_tokens - 1):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    return prefill.ms, decode.ms / (new_tokens - 1), torch.cat(tokens, 1)


# Sibling projections that read the same input; the GPU fast path runs each group as one matmul.
FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedLinear(torch.nn.Module):
    """Sibling projections (q, k, v; gate, up) as one matmul over their concatenated weights: at
    batch 1 each is a GEMV that pays a launch and, when small (k, v), underuses the memory bus.
    The first sibling's call computes it and the others take their columns of the same result;
    the cache empties after the last sibling, so torch.compile traces one matmul and guards on a
    state that is the same at every call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, parts: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.parts, self.calls, self.cached = parts, 0, None
        self.tinygemm_group = tinygemm_group(weight)
        if self.tinygemm_group:
            # torchao pads in_features to a multiple of 1024, so each call pads its input: at batch 1
            # one more kernel after every norm that feeds a padded projection (3840 -> 4096 in Gemma 3 12B).
            # tinygemm needs only whole 128-wide k-tiles, and its layout (qdata [n/8, k/128, 32, 4],
            # scale_and_zero [k/group, n, 2]) keeps each k-tile apart, so the padding's tiles drop off.
            # Copies of their own: a view (scale_and_zero's slice along dim 0 is already contiguous, so
            # .contiguous() returned one) kept the padding's whole storage alive.
            self.register_buffer("qdata", weight.qdata[:, : self.in_features // TINYGEMM_K_TILE].clone())
            self.register_buffer("scale_and_zero", weight.scale_and_zero[: self.in_features // self.tinygemm_group].clone())
            self.padding_bytes_dropped = weight.qdata.nbytes + weight.scale_and_zero.nbytes \
                - self.qdata.nbytes - self.scale_and_zero.nbytes
        else:
            self.weight = torch.nn.Parameter(weight, requires_grad=False)
            self.padding_bytes_dropped = 0

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tinygemm_group:
            return torch.nn.functional.linear(x, self.weight, self.bias)
        # No output padding to cut: concat_weights stacks only row counts that are multiples of 8.
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                               self.qdata, self.tinygemm_group, self.scale_and_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is None or self.cached[0] is not x:
            self.cached = (x, self.matmul(x))
        y = self.cached[1]
        self.calls += 1
        if self.calls == self.parts:
            self.cached, self.calls = None, 0
        return y


TINYGEMM_K_TILE = 128  # k values per tile of tinygemm's layout with torchao's inner_k_tiles of 8


def tinygemm_group(weight: torch.Tensor) -> int | None:
    """The group size of a torchao tinygemm-layout int4 weight whose padding can be dropped, else None."""
    if type(weight).__name__ != "Int4TilePackedTo4dTensor" or weight.act_pre_scale is not None:
        return None
    group, k = weight.block_size[-1], weight.shape[1]
    inner_k_tiles = weight.qdata.shape[-1] * 2
    if inner_k_tiles * 16 != TINYGEMM_K_TILE or k % TINYGEMM_K_TILE or k % group:
        return None
    return group


class FusedPart(torch.nn.Module):
    def __init__(self, fused: FusedLinear, start: int, end: int):
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x)[..., self.start:self.end]


def concat_weights(weights: list[torch.Tensor]) -> torch.Tensor | str:
    """The weights stacked along the output dimension, or why they cannot be."""
    first = weights[0]
    if len({w.shape[1] for w in weights}) > 1:
        return "different input sizes"
    if all(type(w) in (torch.Tensor, torch.nn.Parameter) for w in weights):
        return torch.cat([w.detach() for w in weights])
    kind = type(first).__name__
    if kind == "Int4TilePackedTo4dTensor" and all(type(w) is type(first) for w in weights):
        # tinygemm's layout: qdata [n/8, k/128, 32, 4] and scale_and_zero [k/group, n, 2], so rows
        # stack when no part was padded to a multiple of 8 rows.
        if any(w.shape[0] % 8 or w.act_pre_scale is not None or w.block_size != first.block_size for w in weights):
            return f"{kind}: padded rows, activation scales or different groups"
        return type(first)(torch.cat([w.qdata for w in weights]), torch.cat([w.scale_and_zero for w in weights], 1),
                           first.block_size, torch.Size([sum(w.shape[0] for w in weights), first.shape[1]]))
    return f"{kind} weights"


def fuse_projections(model: torch.nn.Module) -> dict:
    """Replace each group of sibling projections by one FusedLinear; counts of what was fused and
    of why a group was not."""
    fused, unfused, dropped = Counter(), Counter(), 0
    # The parents only: a list that held the projections themselves would keep every replaced
    # weight alive until the end (on the H100, 14 GB more at the inference peak).
    parents = [m for m in model.modules() if any(hasattr(m, names[0]) for names in FUSABLE)]
    for module in parents:
        for names in FUSABLE:
            parts = [getattr(module, n, None) for n in names]
            if not all(isinstance(p, torch.nn.Linear) for p in parts):
                continue
            label = "+".join(names)
            # Subclasses (bitsandbytes' Linear4bit, quanto's) have forwards of their own; hooks (offloading) fetch weights.
            if any(type(p) is not torch.nn.Linear or p._forward_hooks or p._forward_pre_hooks or hasattr(p, "_hf_hook")
                   for p in parts):
                unfused[f"{label}: {type(parts[0]).__name__} modules or hooks"] += 1
                continue
            if len({p.bias is None for p in parts}) > 1:
                unfused[f"{label}: some with bias"] += 1
                continue
            weight = concat_weights([p.weight for p in parts])
            if isinstance(weight, str):
                unfused[f"{label}: {weight}"] += 1
                continue
            bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
            group = FusedLinear(weight, bias, len(parts))
            dropped += group.padding_bytes_dropped
            start = 0
            for name, part in zip(names, parts):
                setattr(module, name, FusedPart(group, start, start + part.weight.shape[0]))
                start += part.weight.shape[0]
                # torchao binds each quantized Linear's extra_repr to the module itself: a reference
                # cycle that only the cycle collector frees. Broken here, each layer's replaced
                # weights go at once (collected at the end, every layer's stayed: 4 GB more at the
                # H100's int4 peak).
                for attr, value in list(vars(part).items()):
                    if getattr(value, "__self__", None) is part:
                        delattr(part, attr)
            fused[label] += 1
    gc.collect()  # any other cycle
    return {"fused": dict(fused), "unfused": dict(unfused), "padding_bytes_dropped": dropped}


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layers to compile one at a time")
    # A forward set on the layer itself (accelerate's hooks wrap it so) would be bypassed, then deleted.
    if any("forward" in vars(layer) for layer in layers):
        raise TypeError(f"{type(model).__name__}: its decoder layers' forward is wrapped (hooks)")
    return layers


class LayerCache:
    """One layer's part of a cache, handed to that layer alone: the layer's index, by which a cache is
    read, then never reaches the traced code, so layers of one type share one compiled graph."""

    def __init__(self, part):
        self.part = part

    def update(self, keys, values, layer_idx, *args, **kwargs):
        return self.part.update(keys, values, *args, **kwargs)


def layer_forward(layer, cache: LayerCache, *args, past_key_values=None, **kwargs):
    return type(layer).forward(layer, *args, past_key_values=cache, **kwargs)


class StaticDecoder:
    """Greedy decoding from a static KV cache. On a GPU one decode step is captured in a CUDA graph
    (compiled first, when asked) and replayed per token: the step writes the next token and position
    into its own input buffers, so a replay needs nothing from the host. compile_scope layers compiles
    one decoder layer per layer type and runs the rest eagerly inside the same graph; model compiles the
    whole step as one graph (the 48 layers of a 12B model unrolled)."""

    def __init__(self, model, batch: int, max_len: int, compiled: bool = False, graph: bool = True,
                 compile_mode: str = "default", coordinate_descent: bool = False, compile_scope: str = "layers",
                 autotune_pointwise: bool = False):
        from transformers import StaticCache

        self.model = model
        # Every layer gets a full-length static cache: the model's sliding-window layers then mask
        # by position, and no Python-side counter (which a graph would freeze) decides anything.
        config = copy.copy(model.config.get_text_config(decoder=True))
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        device = modeling.model_device(model)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        if compiled:
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = coordinate_descent  # tunes the fused reductions (norms, argmax)
            inductor.triton.autotune_pointwise = autotune_pointwise  # times several configs per pointwise kernel
            if compile_scope == "layers":
                layer_step = torch.compile(layer_forward, fullgraph=True, dynamic=False, mode=compile_mode)
                self.layer_forwards = [(layer, functools.partial(layer_step, layer, LayerCache(part)))
                                       for layer, part in zip(decoder_layers(model), self.cache.layers, strict=True)]
                self.step = self._step_by_layer
            else:
                self.step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=compile_mode)
        else:
            self.step = self._step
        self.graph, self.compile_s = None, None
        if graph:
            self._warm_and_capture()

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.model(input_ids=self.token, position_ids=self.position[None].expand(self.token.shape[0], -1),
                            cache_position=self.position, past_key_values=self.cache, use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

    def _step_by_layer(self) -> None:
        # For this step only (the prefill stays eager), each decoder layer runs through the one compiled
        # function with its own part of the cache.
        for layer, forward in self.layer_forwards:
            layer.forward = forward
        try:
            self._step()
        finally:
            for layer, _ in self.layer_forwards:
                del layer.forward

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.cache.reset()
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        logits = self.model(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1),
                            cache_position=positions, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(length)

    def _warm_and_capture(self) -> None:
        # The cache's tensors are allocated by the first forward; warm up (and compile) on a side
        # stream, as CUDA-graph capture requires, then capture one step.
        self.prefill(torch.zeros(self.token.shape[0], 1, dtype=torch.long, device=self.token.device))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.compile_s = round(time.perf_counter() - t0, 2)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    @torch.no_grad()
    def run(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
        device = ids.device
        with Timer(device) as prefill:
            self.prefill(ids)
        tokens = torch.empty(ids.shape[0], new_tokens, dtype=torch.long, device=device)
        tokens[:, :1] = self.token
        with Timer(device) as decode:
            for i in range(1, new_tokens):
                self.graph.replay() if self.graph is not None else self.step()
                tokens[:, i:i + 1] = self.token
        return prefill.ms, decode.ms / (new_tokens - 1), tokens


def decode_attention(choice: str):
    """math: torch's own SDPA formula, which torch.compile fuses into a few Triton kernels; for one
    query over a short static cache that beats the fused attention kernels, which (cuDNN's) also
    need the mask written out per layer. auto: torch's choice. Otherwise SDPBackend names, comma-separated."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "auto":
        return nullcontext()
    return sdpa_kernel([getattr(SDPBackend, name.strip().upper()) for name in choice.split(",")])


COMPILE_LABELS = {"layers": "torch.compile per layer", "model": "torch.compile", None: "eager"}
FALLBACKS = ("layers", "model", None)  # the compile scopes tried, from the configured one on


def measure_latency(model, settings: dict, bytes_per_token: int, bandwidth: float) -> dict:
    """Per batch size: warm-up, then the median of `repeats` runs; the fast path where it works.
    The bandwidth floor: the weight bytes a step reads over the copy bandwidth."""
    device = modeling.model_device(model)
    prompt, new = settings["prompt_tokens"], settings["new_tokens"]
    vocab = model.get_input_embeddings().weight.shape[0]
    offloaded = any(p.device.type == "meta" for p in model.parameters())
    results, fusion = [], None
    for batch in settings["batch_sizes"]:
        ids = prompt_ids(vocab, batch, prompt, device)
        decode_eager(model, ids[:, : min(prompt, 16)], 2)  # warm-up: kernels, allocator
        run, path, fallback, compile_s, agreement = None, "eager", None, None, None
        if device.type != "cuda":
            fallback = "CPU: eager decoding with a dynamic KV cache"
        elif settings["fast_path"] == "off":
            fallback = "fast_path: off in the config"
        elif offloaded:
            fallback = "weights are offloaded: the hooks that fetch them cannot be captured in a CUDA graph"
        elif len(gpus := {p.device for p in model.parameters() if p.device.type == "cuda"}) > 1:
            fallback = (f"weights span {len(gpus)} GPUs: the decode step's CUDA graph is captured on one device, "
                        "so decoding is eager, the hooks moving activations between GPUs")
        else:
            check = min(new, 16)  # the fast path's first tokens are checked against eager decoding
            _, _, eager_tokens = decode_eager(model, ids, check)
            if settings["fuse_projections"] and fusion is None:
                fusion = fuse_projections(model)
                # The floor counts what the fused model holds: fusion may drop padding no step reads.
                bytes_per_token = weight_bytes_per_token(model, modeling.real_bytes(model))
                log.info("benchmark: fused projections %s; not fused: %s; padding dropped: %.3f GB", fusion["fused"],
                         fusion["unfused"] or "none", fusion["padding_bytes_dropped"] / 1e9)
            fused = " + fused projections" if fusion and fusion["fused"] else ""
            for scope in FALLBACKS[FALLBACKS.index(settings["compile_scope"]):]:
                try:
                    with decode_attention(settings["decode_attention"]):  # chosen while tracing and capturing
                        decoder = StaticDecoder(model, batch, prompt + new, scope is not None,
                                                compile_mode=settings["compile_mode"],
                                                coordinate_descent=settings["coordinate_descent"], compile_scope=scope,
                                                autotune_pointwise=settings["autotune_pointwise"])
                except Exception as e:  # noqa: BLE001 - any failure means: try the next path, say why
                    fallback = f"{COMPILE_LABELS[scope]} CUDA graph failed: {type(e).__name__}: {e}"[:500]
                    log.info("benchmark: %s", fallback)
                    torch._dynamo.reset()
                    continue
                run, compile_s = decoder.run, decoder.compile_s
                path = (f"static cache{fused} + {COMPILE_LABELS[scope]} + CUDA graph" if scope
                        else f"static cache{fused} + CUDA graph (eager kernels)")
                _, _, fast_tokens = run(ids, check)
                agreement = float((fast_tokens == eager_tokens).float().mean())
                break
        run = run or (lambda i, n: decode_eager(model, i, n))
        run(ids, new)  # warm-up at full length
        prefills, decodes = [], []
        for r in range(settings["repeats"]):
            prefill_ms, decode_ms, _ = run(ids, new)
            prefills.append(prefill_ms)
            decodes.append(decode_ms)
            log.info("benchmark: batch %d, repeat %d/%d: prefill %.1f ms, decode %.2f ms/token (%s)", batch, r + 1,
                     settings["repeats"], prefill_ms, decode_ms, path)
        decode_ms = statistics.median(decodes)
        entry = {"batch_size": batch, "prompt_tokens": prompt, "new_tokens": new, "path": path,
                 "prefill_ms": round(statistics.median(prefills), 3), "decode_ms_per_token": round(decode_ms, 4),
                 "tokens_per_s": round(batch * 1000 / decode_ms, 2),
                 "total_s": round((statistics.median(prefills) + decode_ms * (new - 1)) / 1000, 4),
                 "decode_ms_all": [round(d, 4) for d in decodes], "compile_s": compile_s,
                 # (max - min) / median of the repeats: what the nightly gate allows a baseline to move by.
                 "decode_spread": round((max(decodes) - min(decodes)) / decode_ms, 4),
                 "greedy_agreement_with_eager": agreement,
                 **({k: settings[k] for k in ("coordinate_descent", "autotune_pointwise")} if "torch.compile" in path else {})}
        if fallback and path == "eager":
            entry["fallback_reason"] = fallback
        floor_ms = bytes_per_token / bandwidth * 1000
        if floor_ms > 0:
            entry["bandwidth_floor_ms"] = round(floor_ms, 4)
            entry["of_bandwidth_floor"] = round(decode_ms / floor_ms, 3)
        results.append(entry)
    first = results[0]
    return {**{k: first[k] for k in ("decode_ms_per_token", "decode_spread", "prefill_ms", "tokens_per_s", "total_s",
                                      "path", "compile_s") if k in first}, "decode_spread_over": "repeats",
            **({"of_bandwidth_floor": first["of_bandwidth_floor"]} if "of_bandwidth_floor" in first else {}),
            **({"projections": fusion} if fusion else {}), "runs": results}


# ---------------------------------------------------------------- one measurement, in its own process

def limits_of(settings: dict) -> dict:
    return {k: settings[k] for k in ("max_memory", "offload_to_disk") if settings.get(k)}


def loader(spec: dict):
    """A function that loads the model as a user does: the reference, a recipe's saved checkpoint
    (mode `saved`), or the reference quantized while loading (mode `quantize_on_load`). Libraries are
    imported and the plan made here, so the load's samples hold the load alone."""
    from transformers import AutoConfig

    settings = spec["settings"]
    kwargs = {}
    if settings.get("max_memory"):
        kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in settings["max_memory"].items()}
    if settings.get("offload_to_disk"):
        kwargs["offload_folder"] = str(Path(spec["out_dir"]) / "offload")
    device = "auto" if kwargs else modeling.resolve_device(spec["device"])
    config = AutoConfig.from_pretrained(spec["checkpoint"])
    modeling.model_class(config)
    if spec["recipe"] is None:
        return lambda: modeling.load(spec["checkpoint"], spec["dtype"], device, **kwargs)
    recipe = parse_recipe(spec["recipe"])
    backend = backend_of(recipe)
    for module in backend.imports:
        importlib.import_module(module)
    if spec["mode"] == "saved":
        return lambda: backend.load(Path(spec["checkpoint"]), device, spec["dtype"], **kwargs)
    keep = kept(plan_recipe(modeling.skeleton(config), recipe))
    return lambda: quantize_model(spec["checkpoint"], recipe, spec["dtype"], device, keep, **kwargs)


def caveats(recipe) -> dict:
    """The kernel the recipe ran on and why its latency does not stand for serving, where its backend says."""
    why = backend_of(recipe).latency_caveat(recipe)
    return {**kernel_of(recipe), **({"latency_caveat": why} if why else {})}


def first_forward(model, device: torch.device) -> None:
    with torch.no_grad():
        model(input_ids=prompt_ids(model.config.get_text_config().vocab_size, 1, 8, device))


def measure(spec: dict) -> dict:
    """Memory while loading, then (unless the spec says latency: false) memory and latency while generating."""
    settings = spec["settings"]
    load_model = loader(spec)
    sampler = MemorySampler(settings["sample_interval_ms"])
    try:
        t0 = time.perf_counter()
        with sampler.phase("load"):
            model = load_model()
        load_s = time.perf_counter() - t0
        at_load = modeling.real_bytes(model)
        shard = largest_shard(spec["checkpoint"])
        load = sampler.peaks["load"]
        diagnostics = diagnose({"load": load}, at_load, shard, sampler.baseline["RssAnon"])
        if not spec.get("latency", True):
            return {"real_bytes": at_load, "load_s": round(load_s, 2), "largest_shard": shard,
                    "memory": {**load, "host_private_baseline": sampler.baseline["RssAnon"]},
                    "diagnostics": diagnostics}
        device = modeling.model_device(model)
        bandwidth = spec.get("copy_bandwidth") or copy_bandwidth(device)
        with sampler.phase("infer"):
            first_forward(model, device)
            real = modeling.real_bytes(model)  # what it runs in: a library may expand its weights on the first forward
            per_token = weight_bytes_per_token(model, real)
            log.info("benchmark: loaded in %.1f s, real bytes %.3f GB, floor %.3f ms/token at %.0f GB/s", load_s,
                     real / 1e9, per_token / bandwidth * 1000, bandwidth / 1e9)
            latency = measure_latency(model, settings, per_token, bandwidth)
        if grown := growth(at_load, real, "model"):
            diagnostics.append(grown)
        infer = sampler.peaks["infer"]
        memory = {"host_private_peak": max(load["host_private_peak"], infer["host_private_peak"]),
                  "host_file_peak": max(load["host_file_peak"], infer["host_file_peak"]),
                  "host_private_baseline": sampler.baseline["RssAnon"],
                  "host_peak_incl_file_pages": proc_status()["VmHWM"],
                  "gpu_peak_load": load["gpu_peak_allocated"], "gpu_reserved_peak_load": load["gpu_peak_reserved"],
                  "gpu_peak_infer": infer["gpu_peak_allocated"], "gpu_reserved_peak_infer": infer["gpu_peak_reserved"],
                  "load": load, "infer": infer}
        return {"real_bytes": real, "real_bytes_at_load": at_load, "load_s": round(load_s, 2), "memory": memory,
                "latency": latency,
                "copy_bandwidth": bandwidth, "weight_bytes_per_token": per_token, "largest_shard": shard,
                "placement": modeling.devices_of(model), "device": str(device), "loaded": spec["checkpoint"],
                "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                **(caveats(parse_recipe(spec["recipe"])) if spec["recipe"] else {}),
                "dtype": modeling.computed_dtype(model), "limits": limits_of(settings), "diagnostics": diagnostics}
    finally:
        sampler.close()


def long_prompt(checkpoint: str, tokens: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """The start of WikiText-2's test split in the checkpoint's tokenizer, or random ids where it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        log.info("benchmark: no tokenizer in %s (%s): random token ids", checkpoint, e)
        return prompt_ids(vocab, 1, tokens, device), "random token ids (the checkpoint has no tokenizer)"
    text = (DATA_DIR / "wikitext2" / "test.txt").read_text()
    # Generous: the text is cut before tokenizing, and some tokenizers take many characters a token.
    ids = tokenizer(text[: tokens * 40], return_tensors="pt").input_ids[:, :tokens]
    return ids.to(device), f"WikiText-2 test, its first {ids.shape[1]:,} tokens"


def measure_kv_cache(spec: dict) -> dict:
    """The model loaded as for the benchmark, then its KV-cache capacity under the memory budget for each
    cache, and the quantized caches' KL on a long prompt."""
    settings, kv = spec["settings"], spec["settings"]["kv_cache"]
    model = loader(spec)()
    spread = modeling.devices_of(model)["param_bytes_by_device"]  # offloaded weights count as a device
    if len(spread) > 1:
        return {"status": "not_run",
                "reason": f"the model spans {sorted(spread)}: the capacity is measured on one device"}
    text = model.config.get_text_config(decoder=True)
    limit = kv["max_context"] or text.max_position_embeddings
    t0 = time.perf_counter()
    result = kvcache.capacity(model, settings["memory_budget"], kv["caches"], kv["prefill_chunk"], limit,
                              kv["decode_tokens"], kv["bits"])
    log.info("benchmark: KV-cache capacity in %.1f s: %s", time.perf_counter() - t0,
             {k: c.get("context_tokens", c["status"]) for k, c in result["caches"].items()})
    quantized = [k for k in kv["caches"] if k in kvcache.QUANTIZED]
    if quantized:
        ids, result["kl_prompt"] = long_prompt(spec["checkpoint"], kv["kl_prompt_tokens"], text.vocab_size,
                                               modeling.model_device(model))
        result["kl"] = kvcache.quantized_cache_kl(model, ids, quantized, kv["prefill_chunk"],
                                                  min(kv["kl_positions"], ids.shape[1] - 1), kv["bits"])
    return {"status": "ok", **result}


def main(spec_path: str, out_path: str) -> None:
    # force: importing Prefect gave the root its own handler and WARNING, which dropped these lines
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    spec = json.loads(Path(spec_path).read_text())
    write_json(Path(out_path), measure_kv_cache(spec) if spec.get("measure") == "kv_cache" else measure(spec))


# ---------------------------------------------------------------- the step

def benchmark(name: str, checkpoint: str, recipe: dict | None, dtype: str, device: str, settings: dict,
              out_dir: str, reference: dict | None = None, base_checkpoint: str | None = None,
              cache_dir: str | None = None) -> dict:
    """Measure one model in a fresh process: the reference (recipe None) or a recipe's saved checkpoint,
    what ships. Where the recipe's backend quantizes while loading and `base_checkpoint` is given, the
    reference quantized while loading is measured too, in a process of its own (`quantize_on_load`).
    A process that dies (out of memory, a load that fails under a memory limit) becomes a record with its error.
    Inductor's compiled kernels are kept in `cache_dir`/inductor, so a model compiled once compiles again in a
    fraction of the time on the next run."""
    parsed = parse_recipe(recipe) if recipe is not None else None
    if parsed is not None and (skipped := cuda_skip(parsed, modeling.resolve_device(device))):
        return skipped
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"checkpoint": checkpoint, "recipe": recipe, "dtype": dtype, "device": device, "settings": settings,
            "out_dir": str(out), "copy_bandwidth": (reference or {}).get("copy_bandwidth"),
            "mode": "reference" if recipe is None else "saved",
            "inductor_cache": str(Path(cache_dir) / "inductor") if cache_dir else None}
    result = measured_in_processes(name, spec, out, settings["processes"])
    if result["status"] != "ok":
        return result
    if reference and reference.get("latency"):
        compare_with_reference(result, reference)
    warnings = list(result["diagnostics"])
    if result.get("latency_caveat"):
        result["latency"]["representative_of_serving"] = False
        warnings.append(f"latency: {result['latency_caveat']}")
    for run in result["latency"]["runs"]:
        if run.get("greedy_agreement_with_eager") is not None and run["greedy_agreement_with_eager"] < 0.5:
            warnings.append(f"batch {run['batch_size']}: the fast path's greedy tokens agree with eager decoding on "
                            f"only {run['greedy_agreement_with_eager']:.0%} of the first 16")
    if settings.get("memory_budget"):
        result["kv_cache"] = kv_cache = run_measurement(name, {**spec, "measure": "kv_cache"},
                                                        out / "benchmark-kv-cache.json")
        warnings += kv_cache_warnings(kv_cache)
    if base_checkpoint and settings["quantize_on_load"] and quantizes_while_loading(parsed):
        on_load = run_measurement(name, {**spec, "checkpoint": base_checkpoint, "mode": "quantize_on_load",
                                         "latency": False}, out / "benchmark-quantize-on-load.json")
        result["quantize_on_load"] = on_load
        warnings += [f"quantize on load: {d}" for d in on_load.get("diagnostics", [])]
        if on_load["status"] != "ok":
            warnings.append(f"quantize on load: {on_load['reason']}")
    return {**result, "warnings": warnings}


def kv_cache_warnings(kv_cache: dict) -> list[str]:
    if kv_cache["status"] != "ok":
        return [f"KV cache: {kv_cache['reason']}"]
    ratio = kv_cache.get("bytes_per_token_ratio")
    if ratio is not None and not 0.85 <= ratio <= 1.15:
        return [f"KV cache: each token of context took {kv_cache['bytes_per_token_measured']:,} bytes, the config "
                f"says {kv_cache['bytes_per_token_config']:,} ({ratio:.2f}x)"]
    return []


def measured_in_processes(name: str, spec: dict, out: Path, processes: int) -> dict:
    """The measurement in `processes` fresh processes: the one with the median decode figure, with every
    process's figure and their spread, (max - min) / median, in its latency (one process: its repeats' spread)."""
    if processes == 1:
        return run_measurement(name, spec, out / "benchmark.json")
    results = [run_measurement(name, spec, out / f"benchmark-process{i}.json") for i in range(1, processes + 1)]
    if failed := next((r for r in results if r["status"] != "ok"), None):
        return failed
    results.sort(key=lambda r: r["latency"]["decode_ms_per_token"])
    chosen = results[(len(results) - 1) // 2]
    figures = [r["latency"]["decode_ms_per_token"] for r in results]
    chosen["latency"].update(decode_ms_by_process=figures,
                             decode_spread=round((max(figures) - min(figures)) / chosen["latency"]["decode_ms_per_token"], 4),
                             decode_spread_over="processes")
    write_json(out / "benchmark.json", {k: v for k, v in chosen.items() if k != "status"})
    return chosen


def quantizes_while_loading(recipe) -> bool:
    return backend_of(recipe).load_config(recipe, []) is not None


def measurement_env(spec: dict) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if spec.get("inductor_cache"):
        # set over any inherited value: inductor writes its /tmp default into the environment once used
        env["TORCHINDUCTOR_CACHE_DIR"] = spec["inductor_cache"]
    return env


def run_measurement(name: str, spec: dict, result_path: Path) -> dict:
    """`python -m tasks.benchmark SPEC OUT` under the step's timeout; its result, or a record of its error."""
    settings, out = spec["settings"], Path(spec["out_dir"])
    spec_path = result_path.with_name(result_path.stem + "-spec.json")
    write_json(spec_path, spec)
    result_path.unlink(missing_ok=True)
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen([sys.executable, "-m", "tasks.benchmark", str(spec_path), str(result_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1], env=measurement_env(spec))

    def pump():
        for line in proc.stderr:
            tail.append(line.rstrip())
            if line.startswith("benchmark"):
                log.info("%s: %s", name, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=settings["timeout_s"])
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"status": "error", "reason": f"the benchmark process ran past {settings['timeout_s']:g} s"}
    finally:
        reader.join(timeout=5)
        shutil.rmtree(out / "offload", ignore_errors=True)
    limits = limits_of(settings)
    if code != 0 or not result_path.is_file():
        error = next((line for line in reversed(tail) if re.match(r"^[\w.]+(Error|Exception)\b", line)), None) \
            or (tail[-1] if tail else "no output")
        why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
        return {"status": "error", "reason": f"the benchmark process failed ({why}): {error}"
                + (f"; under the limits {limits}" if limits else ""), "limits": limits, "log_tail": list(tail)[-15:]}
    return {"status": "ok", **json.loads(result_path.read_text())}


def compare_with_reference(result: dict, reference: dict) -> None:
    """Adds the speedup over the reference, and the GPU peak's reduction, to a recipe's result."""
    result["latency"]["speedup_vs_reference"] = round(
        reference["latency"]["decode_ms_per_token"] / result["latency"]["decode_ms_per_token"], 3)
    # GPU peaks compare; host peaks of two processes differ by the libraries each imported.
    if reference["memory"]["gpu_peak_infer"] and result["memory"]["gpu_peak_infer"]:
        result["memory"]["peak_reduction_vs_reference"] = round(
            1 - result["memory"]["gpu_peak_infer"] / reference["memory"]["gpu_peak_infer"], 4)


benchmark_task = task(benchmark, name="benchmark", task_run_name="benchmark-{name}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
