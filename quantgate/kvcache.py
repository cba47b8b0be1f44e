"""KV-cache capacity: what a token of context costs (by the config, and as measured), the longest
context that fits a memory budget with each cache transformers offers, found by prefilling in chunks
until it no longer fits, decode latency at that context, and what a quantized cache does to the
next-token distribution of a long prompt against the full-precision cache.

"Context" counts every token in the cache: the prompt and what was generated. On a GPU the budget
covers what torch reserves plus the CUDA context, and the allocator is held to it, so "does not fit"
is an out-of-memory error; on a CPU it covers the process's private memory, sampled."""
from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import dataclass, field

import torch

from quantgate.drift import kl_per_token
from quantgate.longrange import bucket_of
from quantgate.measure import Timer, memory_of, trim_heap
from quantgate.modeling import model_device

log = logging.getLogger("quantgate.kvcache")

CACHES = ("dynamic", "static", "offloaded", "quanto", "hqq", "fp8")
QUANTIZED = ("quanto", "hqq", "fp8")


def cache_bytes(config, dtype_bytes: int, tokens: int) -> int:
    """KV bytes that `tokens` of context take by the config: keys and values of every layer that holds
    them, a sliding-window layer at most its window."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True)
    types, kwargs = get_layer_types_and_kwargs(text)
    total = 0
    for kind, extra, layer in zip(types, kwargs, text.per_layer_config):
        if kind == "dummy":  # a layer that reads another layer's cache
            continue
        heads = getattr(layer, "num_key_value_heads", None) or layer.num_attention_heads
        head_dim = getattr(layer, "head_dim", None) or layer.hidden_size // layer.num_attention_heads
        total += 2 * heads * head_dim * dtype_bytes * min(tokens, extra.get("sliding_window") or tokens)
    return total


def longest_window(config) -> int:
    from transformers.cache_utils import get_layer_types_and_kwargs

    _, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    return max((extra.get("sliding_window") or 0 for extra in kwargs), default=0)


def new_cache(kind: str, model, max_len: int, bits: int):
    """A fresh cache of that kind for the model, or the reason transformers does not offer it here."""
    from transformers import DynamicCache, QuantizedCache, StaticCache

    if kind == "offloaded" and model_device(model).type != "cuda":
        return "offloading moves the cache from a GPU to host memory: the model is not on a GPU"
    try:
        if kind in ("dynamic", "offloaded"):
            return DynamicCache(config=model.config, offloading=kind == "offloaded")
        if kind == "static":
            return StaticCache(config=model.config, max_cache_len=max_len)
        if kind == "fp8":
            return QuantizedCache("fp8", config=model.config)
        return QuantizedCache(kind, config=model.config, nbits=bits)
    except (ValueError, ImportError) as e:  # transformers' own refusal: a sliding-window model, a missing package
        return f"{type(e).__name__}: {e}"


def forward(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """The next-token logits after `ids`, which follow `start` tokens already in the cache."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    return model(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1), cache_position=positions,
                 past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]


def released() -> None:
    """Memory of a dropped cache back to where the next measurement starts."""
    gc.collect()
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Fill:
    tokens: int = 0  # tokens in the cache that fit
    stopped_by: str | None = None  # why it went no further; None: it reached the length asked
    peak: int = 0
    held: list[tuple[int, int]] = field(default_factory=list)  # (tokens, bytes held after that chunk)


class Search:
    """Prefills caches in chunks under a memory budget."""

    def __init__(self, model, ids: torch.Tensor, budget: int, chunk: int, bits: int):
        self.model, self.ids, self.budget, self.chunk, self.bits = model, ids, budget, chunk, bits
        self.memory = memory_of(ids.device)

    @torch.no_grad()
    def fill(self, cache, tokens: int, budgeted: bool = True) -> Fill:
        """Prefill `tokens` tokens chunk by chunk, stopping at the first chunk that does not fit (on a GPU the
        allocator's limit holds either way)."""
        done = Fill()
        for start in range(0, tokens, self.chunk):
            end = min(start + self.chunk, tokens)
            self.memory.reset()
            try:
                forward(self.model, cache, self.ids[:, start:end], start)
            except torch.OutOfMemoryError:
                done.stopped_by = f"out of memory prefilling tokens {start:,}-{end:,}"
                return done
            peak = self.memory.peak()
            if budgeted and peak > self.budget:
                done.stopped_by = f"tokens {start:,}-{end:,} took the peak to {peak / 2**30:.2f} GiB"
                return done
            done.tokens, done.peak = end, max(done.peak, peak)
            done.held.append((end, self.memory.held()))
        return done

    def fits(self, kind: str, tokens: int) -> Fill:
        cache = new_cache(kind, self.model, tokens, self.bits)
        try:
            return self.fill(cache, tokens)
        finally:
            del cache
            released()

    def longest(self, kind: str, limit: int, guess: int) -> Fill:
        """The longest context that fits, to within one chunk. The growing caches are filled once until they
        stop. A static cache is sized for the context it holds, so lengths are tried: from `guess`, up or down
        in doubling steps until one fits and one does not, then halving that bracket."""
        if kind != "static":
            return self.fits(kind, limit)
        top = -(-limit // self.chunk)  # n chunks hold min(n * chunk, limit) tokens
        tried: dict[int, Fill] = {}

        def ok(n: int) -> bool:
            if n not in tried:
                tried[n] = self.fits(kind, min(n * self.chunk, limit))
            return tried[n].stopped_by is None

        low, high, step = 0, top + 1, 1  # low fits (nothing does), high does not
        n = min(max(guess // self.chunk, 1), top)
        if ok(n):
            low = n
            while low < top and ok(m := min(low + step, top)):
                low, step = m, step * 2
            high = m if low < top else high
        else:
            high = n
            while high > 1 and not ok(m := max(high - step, 1)):
                high, step = m, step * 2
            low = m if high > 1 else 0
        while high - low > 1:
            m = (low + high) // 2
            low, high = (m, high) if ok(m) else (low, m)
        best = tried.get(low, Fill())
        best.stopped_by = None if low == top else \
            f"a static cache for {min(high * self.chunk, limit):,} tokens: {tried[high].stopped_by}"
        return best

    @torch.no_grad()
    def decode_ms(self, kind: str, tokens: int, new: int) -> dict:
        """Per-token decode latency, one token at a time, ending at `tokens` in the cache."""
        cache = new_cache(kind, self.model, tokens, self.bits)
        try:
            prefilled = self.fill(cache, tokens - new, budgeted=False)  # the search found that it fits
            if prefilled.stopped_by:
                return {"decode_error": prefilled.stopped_by}
            times = []
            for position in range(tokens - new, tokens):
                with Timer(self.ids.device) as t:
                    forward(self.model, cache, self.ids[:, position:position + 1], position)
                times.append(t.ms)
            median = statistics.median(times)
            return {"decode_ms_per_token": round(median, 3),
                    "decode_spread": round((max(times) - min(times)) / median, 4), "decode_tokens": new}
        except torch.OutOfMemoryError:
            return {"decode_error": f"out of memory decoding at {tokens:,} tokens"}
        finally:
            del cache
            released()

    def close(self) -> None:
        self.memory.close()  # on a GPU, the allocator's limit goes with it


def measured_bytes_per_token(fill: Fill, window: int) -> float | None:
    """Least-squares slope of the bytes held against the tokens, past every sliding window (where each
    token adds to the full-attention layers alone), over the chunks of a growing cache."""
    points = [(t, b) for t, b in fill.held if t > window]
    if len(points) < 3:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_b = statistics.fmean(b for _, b in points)
    return sum((t - mean_t) * (b - mean_b) for t, b in points) / sum((t - mean_t) ** 2 for t, _ in points)


def capacity(model, budget: int, caches: list[str], chunk: int, limit: int, decode_tokens: int, bits: int) -> dict:
    """For each cache: the longest context within `budget`, what stopped it and the decode latency there."""
    device = model_device(model)
    ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, limit),
                        generator=torch.Generator().manual_seed(0)).to(device)
    released()
    search = Search(model, ids, budget, chunk, bits)
    probe = new_cache("dynamic", model, 1, bits)
    with torch.no_grad():
        forward(model, probe, ids[:, :1], 0)
    dtype = probe.layers[0].keys.dtype
    del probe
    released()
    per_token = cache_bytes(model.config, dtype.itemsize, 10**9 + 1) - cache_bytes(model.config, dtype.itemsize, 10**9)
    weights = search.memory.in_use()
    result = {"budget": budget, "device": str(device), "in_use_with_weights": weights, "cache_dtype": str(dtype).removeprefix("torch."),
              "bytes_per_token_config": per_token, "prefill_chunk": chunk, "max_context": limit, "caches": {}}
    free = budget - weights
    guess = max(free // max(per_token, 1), chunk)  # where a static cache's trials start; each is measured
    search.memory.limit(budget)
    try:
        for kind in caches:
            offered = new_cache(kind, model, 1, bits)
            if isinstance(offered, str):
                result["caches"][kind] = {"status": "not_offered", "reason": offered}
                continue
            del offered
            if free <= 0:
                result["caches"][kind] = {"status": "ok", "context_tokens": 0,
                                          "stopped_by": f"the loaded model alone takes {weights / 2**30:.2f} GiB"}
                continue
            fill = search.longest(kind, limit, guess)
            entry = {"status": "ok", "context_tokens": fill.tokens,
                     "stopped_by": fill.stopped_by or f"reached the longest context asked for ({limit:,} tokens)",
                     "peak": fill.peak}
            if kind == "dynamic" and (slope := measured_bytes_per_token(fill, longest_window(model.config))):
                result["bytes_per_token_measured"] = round(slope)
                result["bytes_per_token_ratio"] = round(slope / per_token, 3) if per_token else None
                guess = fill.tokens
            for tokens in (fill.tokens, fill.tokens - chunk):  # a fresh fill to the edge may not fit again
                if tokens > decode_tokens:
                    decoded = search.decode_ms(kind, tokens, decode_tokens)
                    entry.update(decoded, decode_at_tokens=tokens)
                    if "decode_error" not in decoded:
                        entry.pop("decode_error", None)
                        break
            result["caches"][kind] = entry
            log.info("benchmark: KV cache %s: %s tokens fit (%s)", kind, f"{fill.tokens:,}", entry["stopped_by"])
    finally:
        search.close()
    return result


def chunk_logits(model, cache, ids: torch.Tensor, start: int) -> torch.Tensor:
    """Log-probabilities of the next token at every position of a chunk that follows `start` tokens in the cache."""
    positions = torch.arange(start, start + ids.shape[1], device=ids.device)
    logits = model(input_ids=ids, position_ids=positions[None], cache_position=positions, past_key_values=cache,
                   use_cache=True).logits[0]
    return torch.log_softmax(logits.float(), -1)


@torch.no_grad()
def quantized_cache_kl(model, ids: torch.Tensor, kinds: list[str], chunk: int, bits: int, flag_kl: float) -> dict:
    """KL(full-precision cache || quantized cache) of the next-token distribution at every position of `ids`, fed
    `chunk` tokens at a time to a full-precision cache and to each quantized one side by side (each chunk reads the
    ones before it from its cache, as decoding reads the context), by position bucket; the first bucket whose mean
    KL passes `flag_kl` is named."""
    caches = {kind: new_cache(kind, model, ids.shape[1], bits) for kind in ["dynamic", *kinds]}
    results = {k: {"status": "not_offered", "reason": c} for k, c in caches.items() if isinstance(c, str)}
    live = [k for k in kinds if k not in results]
    kl, agree = {k: [] for k in live}, {k: [] for k in live}
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        full = chunk_logits(model, caches["dynamic"], piece, start)
        for kind in live:
            mine = chunk_logits(model, caches[kind], piece, start)
            kl[kind].append(kl_per_token(full, mine).cpu())
            agree[kind].append((full.argmax(-1) == mine.argmax(-1)).float().cpu())
    for kind in live:
        per, same = torch.cat(kl[kind]), torch.cat(agree[kind])
        edges = torch.tensor([bucket_of(p)[0] for p in range(len(per))])
        rows = [{"from": a, "to": min(bucket_of(a)[1], len(per)), "kl_mean": round(per[edges == a].mean().item(), 6),
                 "top1_agreement": round(same[edges == a].mean().item(), 4)} for a in edges.unique().tolist()]
        flagged = next((r for r in rows if r["kl_mean"] > flag_kl), None)
        results[kind] = {"status": "ok", "kl_mean": round(per.mean().item(), 6), "kl_max": round(per.max().item(), 6),
                         "top1_agreement": round(same.mean().item(), 4), "prompt_tokens": len(per), "chunk": chunk,
                         "buckets": rows, "flagged": flagged and f"mean KL {flagged['kl_mean']:.4g} > {flag_kl} at "
                                                                f"positions {flagged['from']:,}-{flagged['to']:,}"}
    del caches
    released()
    return results
