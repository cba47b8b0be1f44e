"""The compiled decode step's attention for one query token over a static cache, with grouped KV heads read as they
are. Under torch.compile, transformers' SDPA wrapper copies K and V out to every query head (repeat_kv) and torch's
math formula then converts them to float32: a float32 copy of twice the cache, every layer, every token (on the H100,
1.19 of the 12B shape's 2.3 ms a token outside the weight matmuls; docs/benchmark.md). Here the query heads of each
KV head are folded into rows of one matrix, Q K^T and P V run in the cache's own dtype (float32 accumulation, the
scores and probabilities rounded to it: looser than the math formula's float32, which the greedy tokens' agreement
with eager decoding watches), the softmax in float32. A prompt goes to SDPA; a model that does not compute with SDPA
(soft-capping, attention sinks, an eager-only tower) keeps its own attention (`decode_attention`)."""
from __future__ import annotations

import contextlib

import torch

NAME = "quantgate_gqa_decode"
UNHANDLED = ("softcap", "position_bias", "s_aux", "sinks")  # arguments this formula does not apply: SDPA's call


def gqa_decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs):
    """transformers' attention interface: query (b, heads, q, d), key and value (b, kv_heads, k, d); returns
    (b, q, heads, d) and no weights."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    if length != 1 or dropout or any(kwargs.get(k) is not None for k in UNHANDLED):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    rows = (query * scale).reshape(batch, kv_heads, heads // kv_heads, dim)  # query head h reads KV head h // groups
    scores = torch.matmul(rows, key.transpose(-1, -2)).float()  # (b, kv_heads, groups, k)
    if attention_mask is not None:
        if attention_mask.shape[1] == heads > 1:  # a mask per query head: folded as the heads are
            attention_mask = attention_mask.reshape(attention_mask.shape[0], kv_heads, heads // kv_heads, -1)
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs, value)  # (b, kv_heads, groups, d)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def register() -> str:
    """The attention (and SDPA's mask format, which it reads) under NAME in transformers' registries."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, gqa_decode_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return NAME


def implementations(config) -> list[str | None]:
    """The attention implementation of a config and of every config nested in it (a multimodal model's towers)."""
    found = [config._attn_implementation]
    for key in getattr(config, "sub_configs", {}):
        if (sub := getattr(config, key, None)) is not None:
            found += implementations(sub)
    return found


def served_by_sdpa(model) -> bool:
    """Whether every part of the model computes attention with SDPA: the ones this attention may stand in for."""
    return set(implementations(model.config)) == {"sdpa"}


@contextlib.contextmanager
def gqa_decoding(model):
    """While the decode step is traced and captured: this attention for a model served by SDPA throughout, set back
    to SDPA after; a model that is not (soft-capping, sinks, an eager tower) keeps its own. Whatever reaches SDPA
    runs its math formula."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    swapped = served_by_sdpa(model)
    if swapped:
        model.set_attn_implementation(register())
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        if swapped:
            model.set_attn_implementation("sdpa")
