"""The decode step's attention with grouped KV heads read as they are (quantgate/bench/attention.py): the same
numbers as SDPA's math formula over the heads copied out, and the same greedy tokens from the static-cache decoder.
Its speed is a GPU figure (docs/benchmark.md)."""
import pytest
import torch

from quantgate.bench.attention import gqa_decode_attention
from quantgate.bench.decode import StaticDecoder, decode_attention, prompt_ids


class Grouped(torch.nn.Module):
    num_key_value_groups = 4
    is_causal = True


def sdpa_math(query, key, value, mask, scale):
    """torch's formula over K and V copied out to every query head, in float32."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1).float() for t in (key, value))
    out = torch.nn.functional.scaled_dot_product_attention(query.float(), key, value, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_one_query_over_grouped_heads_matches_sdpas_formula(dtype, tolerance, mask_kind):
    torch.manual_seed(0)
    query = torch.randn(2, 8, 1, 32, dtype=dtype)
    key, value = torch.randn(2, 2, 40, 32, dtype=dtype), torch.randn(2, 2, 40, 32, dtype=dtype)
    keep = torch.arange(40) < torch.tensor([[25], [40]])  # the first sequence's cache holds 25 tokens of 40
    mask = {"bool": keep[:, None, None, :], None: None,
            "float": torch.where(keep, 0.0, float("-inf"))[:, None, None, :].to(dtype)}[mask_kind]
    out, weights = gqa_decode_attention(Grouped(), query, key, value, mask, scaling=0.125)
    expected = sdpa_math(query, key, value, mask if mask_kind != "float" else mask.float(), 0.125)
    assert weights is None and out.shape == (2, 1, 8, 32) and out.dtype == dtype
    assert (out.float() - expected).abs().max() <= tolerance


def test_values_of_another_head_size_keep_theirs():
    torch.manual_seed(0)  # DeepSeek-V2's attention: query and key heads of 24, value heads of 16
    query, key, value = torch.randn(1, 8, 1, 24), torch.randn(1, 2, 30, 24), torch.randn(1, 2, 30, 16)
    out, _ = gqa_decode_attention(Grouped(), query, key, value, None, scaling=0.2)
    assert out.shape == (1, 1, 8, 16)
    assert (out - sdpa_math(query, key, value, None, 0.2)).abs().max() <= 1e-5


def test_a_prompt_goes_to_sdpa():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 8, 5, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16)
    out, _ = gqa_decode_attention(Grouped(), query, key, value, None, scaling=0.25)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.allclose(out, sdpa_math(query, key, value, causal, 0.25), atol=1e-5)


def test_a_model_not_served_by_sdpa_keeps_its_own_attention(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="eager")
    with decode_attention("gqa", model):  # soft-capping or sinks need the model's own (eager) attention: left as is
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"


def test_the_static_decoder_gives_the_same_tokens_and_the_model_its_attention_back(tiny_llama, monkeypatch):
    from transformers import AutoModelForCausalLM

    from quantgate.bench import attention

    lengths = []  # the query lengths the registered attention was called with

    def counted(module, query, *args, **kwargs):
        lengths.append(query.shape[2])
        return gqa_decode_attention(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "gqa_decode_attention", counted)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = prompt_ids(model.config.vocab_size, 2, 12, torch.device("cpu"))
    tokens = {}
    for choice in ("math", "gqa"):
        with decode_attention(choice, model):
            decoder = StaticDecoder(model, 2, 12 + 16, compiled=False, graph=False)
            tokens[choice] = decoder.run(ids, 16)[2]
        assert model.config._attn_implementation == "sdpa"
    assert torch.equal(tokens["gqa"], tokens["math"])
    # Two layers: the 12-token prompt (to SDPA), then 15 one-token decode steps, all through the registered attention.
    assert lengths == [12, 12] + [1, 1] * 15
