"""Latency of a loaded model: per batch size, a warm-up and then the median of repeated runs, on the fast path
(static cache, compile, CUDA graph) where it works and eagerly where not, with the reason; each figure also read
against the bandwidth floor (the weight bytes a decode step reads over the device's copy bandwidth)."""
from __future__ import annotations

import logging
import statistics
import time

import torch

from quantgate import modeling
from quantgate.bench.decode import (COMPILE_LABELS, FALLBACKS, StaticDecoder, decode_attention, decode_eager,
                                    eager_choices, prompt_ids)
from quantgate.bench.fusion import fuse_projections
from quantgate.measure import Timer, others_busy
from quantgate.settings import BenchmarkSettings

log = logging.getLogger("quantgate.benchmark")


def copy_bandwidth(device: torch.device, repeats: int = 10) -> float:
    """Bytes per second of a large device copy, counting bytes read plus bytes written."""
    n = (2 << 30) if device.type == "cuda" else (256 << 20)
    if device.type == "cuda":
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=device)
    else:  # every page written (no shared zero page to read), but not random: 1 s of one core a measurement
        src = torch.full((n,), 7, dtype=torch.uint8)
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
    if modeling.tied_output_embedding(model):
        return real_bytes
    emb = model.get_input_embeddings().weight
    return real_bytes - emb.numel() * emb.element_size()


class Decoding:
    """How one batch size is decoded: the run function, its path's label, and why not faster where it is not."""

    def __init__(self, model):
        self.run = lambda ids, n: decode_eager(model, ids, n)
        self.path, self.fallback, self.compile_s, self.agreement, self.divergence = "eager", None, None, None, None


def eager_reason(model, settings: BenchmarkSettings) -> str | None:
    """Why the fast path cannot run for this model here, or None."""
    if modeling.model_device(model).type != "cuda":
        return "CPU: eager decoding with a dynamic KV cache"
    if settings.fast_path == "off":
        return "fast_path: off in the config"
    if hasattr(model, "peft_config"):
        return "a peft adapter on top: its LoRA layers run unmerged, eagerly, as peft serves them"
    if any(p.device.type == "meta" for p in model.parameters()):
        return "weights are offloaded: the hooks that fetch them cannot be captured in a CUDA graph"
    if len(gpus := {p.device for p in model.parameters() if p.device.type == "cuda"}) > 1:
        return (f"weights span {len(gpus)} GPUs: the decode step's CUDA graph is captured on one device, so decoding "
                "is eager, the hooks moving activations between GPUs")
    return None


def fast_path(model, ids: torch.Tensor, settings: BenchmarkSettings, fused: str) -> Decoding:
    """The static-cache decoder through the compile scopes in their fallback order, each token of its whole greedy
    generation checked against eager decoding's choice there; eager with the last failure's reason where none
    captures."""
    decoding = Decoding(model)
    check = settings.new_tokens  # output right eagerly and wrong under the graph can start late (vLLM #46329)
    for scope in FALLBACKS[FALLBACKS.index(settings.compile_scope):]:
        t0 = time.perf_counter()
        try:
            with decode_attention(settings.decode_attention, model):  # chosen while tracing and capturing
                decoder = StaticDecoder(model, ids.shape[0], settings.prompt_tokens + settings.new_tokens,
                                        scope is not None, compile_mode=settings.compile_mode,
                                        coordinate_descent=settings.coordinate_descent, compile_scope=scope,
                                        autotune_pointwise=settings.autotune_pointwise)
        except Exception as e:  # noqa: BLE001 - any failure means: try the next path, say why
            decoding.fallback = f"{COMPILE_LABELS[scope]} CUDA graph failed: {type(e).__name__}: {e}"[:500]
            log.info("benchmark: %s", decoding.fallback)
            torch._dynamo.reset()
            continue
        decoding.run, decoding.compile_s = decoder.run, decoder.compile_s
        decoding.path = (f"static cache{fused} + {COMPILE_LABELS[scope]} + CUDA graph" if scope
                         else f"static cache{fused} + CUDA graph (eager kernels)")
        t1 = time.perf_counter()
        _, _, fast_tokens = decoding.run(ids, check)
        eager_tokens = eager_choices(model, ids, fast_tokens)  # one forward, not a token-by-token eager decode
        same = (fast_tokens == eager_tokens).all(0)
        decoding.agreement = float((fast_tokens == eager_tokens).float().mean())
        decoding.divergence = None if bool(same.all()) else int((~same).nonzero()[0])
        log.info("benchmark: %s built in %.1f s (compile %.1f s), checked against eager in %.1f s: %.1f%% agree",
                 decoding.path, t1 - t0, decoder.compile_s or 0.0, time.perf_counter() - t1, 100 * decoding.agreement)
        break
    return decoding


def timed_runs(decoding: Decoding, ids: torch.Tensor, settings: BenchmarkSettings) -> dict:
    """A warm-up at full length, then `repeats` runs: their medians and spread."""
    new = settings.new_tokens
    decoding.run(ids, new)
    prefills, decodes = [], []
    for r in range(settings.repeats):
        prefill_ms, decode_ms, _ = decoding.run(ids, new)
        prefills.append(prefill_ms)
        decodes.append(decode_ms)
        log.info("benchmark: batch %d, repeat %d/%d: prefill %.1f ms, decode %.2f ms/token (%s)", ids.shape[0], r + 1,
                 settings.repeats, prefill_ms, decode_ms, decoding.path)
    decode_ms, prefill_ms = statistics.median(decodes), statistics.median(prefills)
    return {"batch_size": ids.shape[0], "prompt_tokens": settings.prompt_tokens, "new_tokens": new,
            "path": decoding.path, "prefill_ms": round(prefill_ms, 3), "decode_ms_per_token": round(decode_ms, 4),
            "tokens_per_s": round(ids.shape[0] * 1000 / decode_ms, 2),
            "total_s": round((prefill_ms + decode_ms * (new - 1)) / 1000, 4),
            "decode_ms_all": [round(d, 4) for d in decodes], "compile_s": decoding.compile_s,
            # (max - min) / median of the repeats: what the nightly gate allows a baseline to move by.
            "decode_spread": round((max(decodes) - min(decodes)) / decode_ms, 4),
            "greedy_agreement_with_eager": decoding.agreement, "first_divergence_from_eager": decoding.divergence}


def measure_latency(model, settings: BenchmarkSettings, bytes_per_token: int, bandwidth: float | None, backend=None,
                    ready=None) -> dict:
    """Per batch size: warm-up, then the median of `repeats` runs; the fast path where it works. The bandwidth
    floor: the weight bytes a step reads over the copy bandwidth (measured here where None). `backend` fuses its own
    packed projections. `ready()` is called once, after the first batch size's compile, before anything is timed: it
    returns when the device is the measurement's alone (the flow's turn), so loading and compiling share it (more batch
    sizes compile within the turn)."""
    device, vocab = modeling.model_device(model), model.get_input_embeddings().weight.shape[0]
    results, fusion, why_eager, others = [], None, eager_reason(model, settings), 0.0
    for batch in settings.batch_sizes:
        ids = prompt_ids(vocab, batch, settings.prompt_tokens, device)
        decode_eager(model, ids[:, : min(settings.prompt_tokens, 16)], 2)  # warm-up: kernels, allocator
        if why_eager is None and settings.fuse_projections and fusion is None:
            fusion = fuse_projections(model, backend)
            # The floor counts what the fused model holds: fusion may drop padding no step reads.
            bytes_per_token = weight_bytes_per_token(model, modeling.real_bytes(model))
            log.info("benchmark: fused projections %s; not fused: %s; padding dropped: %.3f GB", fusion["fused"],
                     fusion["unfused"] or "none", fusion["padding_bytes_dropped"] / 1e9)
        fused = " + fused projections" if fusion and fusion["fused"] else ""
        decoding = Decoding(model) if why_eager else fast_path(model, ids, settings, fused)
        if not results:
            bandwidth = alone_from_here(ready, device, bandwidth, bytes_per_token)
        entry, busy = others_busy(lambda: timed_runs(decoding, ids, settings))
        others = max(others, busy)
        if "torch.compile" in decoding.path:
            entry.update(coordinate_descent=settings.coordinate_descent, autotune_pointwise=settings.autotune_pointwise)
        if decoding.path == "eager" and (why := why_eager or decoding.fallback):
            entry["fallback_reason"] = why
        floor_ms = bytes_per_token / bandwidth * 1000
        if floor_ms > 0:
            entry.update(bandwidth_floor_ms=round(floor_ms, 4), of_bandwidth_floor=round(entry["decode_ms_per_token"] / floor_ms, 3))
        results.append(entry)
    first = results[0]
    return {**{k: first[k] for k in ("decode_ms_per_token", "decode_spread", "prefill_ms", "tokens_per_s", "total_s",
                                      "path", "compile_s") if k in first}, "decode_spread_over": "repeats",
            **({"of_bandwidth_floor": first["of_bandwidth_floor"]} if "of_bandwidth_floor" in first else {}),
            **({"projections": fusion} if fusion else {}), "runs": results, "copy_bandwidth": bandwidth,
            "other_busy_cores": others}


def alone_from_here(ready, device: torch.device, bandwidth: float | None, bytes_per_token: int) -> float:
    """Waits for the device to itself (ready), then measures its copy bandwidth where not given: what is timed."""
    if ready is not None:
        t0 = time.perf_counter()
        ready()
        log.info("benchmark: waited %.1f s for the device alone", time.perf_counter() - t0)
    bandwidth = bandwidth or copy_bandwidth(device)
    log.info("benchmark: floor %.3f ms/token at %.0f GB/s", bytes_per_token / bandwidth * 1000, bandwidth / 1e9)
    return bandwidth
