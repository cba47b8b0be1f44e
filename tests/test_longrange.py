"""Damage the short prompts miss (quantgate/longrange.py): a fault planted past the longest validation prompt passes
the 20-prompt check and fails its position bucket; long generations' repetition against the reference's."""
import pytest
import torch

from quantgate import drift, longrange, modeling
from quantgate.backends import ValidateThresholds
from quantgate.settings import ValidateSettings

SETTINGS = ValidateSettings(long_context=2048, long_sequences=1, long_generations=1, long_new_tokens=48,
                            bucket_positions=64, generate_prompts=0)


def past(model, start: int):
    """A fault that acts only past position `start` of a whole sequence: the final norm's output there a thousand
    times too large (a random model's flat next-token distributions turn peaked)."""
    def hook(module, args, output):
        output[:, start:] *= 1000
        return output
    return model.model.norm.register_forward_hook(hook)


@pytest.fixture(scope="module")
def measured(tiny_llama, tmp_path_factory):
    from transformers import AutoTokenizer

    model, tokenizer = modeling.load(tiny_llama, "float32", "cpu"), AutoTokenizer.from_pretrained(tiny_llama)
    cache = tmp_path_factory.mktemp("long")
    short = torch.load(drift.reference_stats(model, tokenizer, "tiny", "float32", cache, SETTINGS)["path"],
                       weights_only=True)
    found = longrange.reference_long(model, tokenizer, cache / longrange.cache_name(SETTINGS), SETTINGS)
    return model, tokenizer, short, torch.load(found["path"], weights_only=True), found


def test_buckets_cover_the_sequence_and_weigh_alike():
    assert longrange.buckets(2048) == [(0, 128), (128, 512), (512, 2048)]
    assert longrange.buckets(300) == [(0, 128), (128, 300)]
    picked = longrange.sampled(2048, 64)
    assert [int(((picked >= a) & (picked < b)).sum()) for a, b in longrange.buckets(2048)] == [64, 64, 64]
    assert longrange.bucket_of(5000) == (2048, 8192) and longrange.bucket_of(127) == (0, 128)


def test_a_fault_past_the_short_prompts_passes_them_and_fails_its_bucket(measured):
    model, tokenizer, short, long, found = measured
    assert found["sequences"] == 2 and found["longest"] == 2048  # one WikiText stretch, one long generation
    start = max(p["ids"].shape[1] for p in short["prompts"]) + 1  # past the longest of the 20 prompts
    assert start < 2048
    handle = past(model, start)
    try:
        today = drift.compare(model, tokenizer, short, SETTINGS)
        now = longrange.compare(model, tokenizer, long, SETTINGS)
    finally:
        handle.remove()
    assert today["kl_mean"] < 1e-6 and today["top1_agreement"] == 1.0  # the short prompts see nothing
    rows = {(r["from"], r["to"]): r for r in now["buckets"]}
    assert rows[(0, 128)]["kl_mean"] < 1e-6 and rows[(128, 512)]["kl_mean"] < 1e-6
    assert rows[(512, 2048)]["kl_mean"] > ValidateThresholds().kl_mean_fail
    verdict, reasons = longrange.verdicts(now, ValidateThresholds())
    assert verdict == "fail" and reasons[0].startswith("positions 512-2,048: mean KL ")
    assert now["generations"][0]["quantized"] == now["generations"][0]["reference"]  # the generation stays short of it


def test_generations_made_together_are_each_what_it_would_be_alone(tiny_llama):
    """Left-padded into one batch, each prompt's greedy tokens and figures are the ones it gets generated alone."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantgate.drift import encode, load_prompts

    torch.manual_seed(0)
    # Weights drawn wide: a next token that depends on its context (the suite's tiny Llama repeats its last token).
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_llama, initializer_range=1.0)).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = [encode(tokenizer, p) for p in load_prompts(SETTINGS) if p["chat"]][:3]
    assert len({p.shape[1] for p in prompts}) > 1  # lengths differ: padded
    together = longrange.generated(model, tokenizer, prompts, 24, batch=3)
    for prompt, made, alone in zip(prompts, together, longrange.generated(model, tokenizer, prompts, 24)):
        assert torch.equal(made["ids"], alone["ids"]) and made["ids"].shape[1] == prompt.shape[1] + 24
        assert made["degeneration"]["distinct_2"] == alone["degeneration"]["distinct_2"]
        assert made["degeneration"]["entropy"] == pytest.approx(alone["degeneration"]["entropy"], abs=2e-4)


def test_long_generations_made_before_stand_in_where_they_start_from_the_reference_prompts(measured):
    model, tokenizer, _, stats, _ = measured
    made = longrange.own_generations(model, tokenizer, SETTINGS)
    plain = longrange.compare(model, tokenizer, stats, SETTINGS)
    before = longrange.compare(model, tokenizer, stats, SETTINGS, made_before=made)
    assert before["generated_before"] is True and before["generations"] == plain["generations"]
    assert "generated_before" not in plain
    # What compare sets beside the reference's is what it was given: a planted text shows.
    planted = longrange.compare(model, tokenizer, stats, SETTINGS, made_before=[{**m, "text": "planted"} for m in made])
    assert [g["quantized_text"] for g in planted["generations"]] == ["planted"] * len(made) == ["planted"]
    # Made from other prompt tokens (another tokenizer's): made again here, the planted text not taken.
    moved = [{**m, "ids": m["ids"].roll(1, 1), "text": "planted"} for m in made]
    again = longrange.compare(model, tokenizer, stats, SETTINGS, made_before=moved)
    assert again["generated_before"] is False and again["generations"] == plain["generations"]


def test_long_generations_that_repeat_more_than_the_reference_fail():
    assert longrange.degeneration([1, 2, 3, 4] * 10) == {"tokens": 40, "repetition": 0.8919, "distinct_2": 0.1026}
    assert longrange.degeneration(list(range(40)))["repetition"] == 0.0
    long = {"buckets": [], "generations": [{"prompt": "chat-1", "reference": {"repetition": 0.1},
                                            "quantized": {"repetition": 0.6}}]}
    verdict, reasons = longrange.verdicts(long, ValidateThresholds())
    assert verdict == "fail"
    assert reasons == ["long generations: 4-gram repetition 0.60 against the reference's 0.10 (+0.50 > 0.3, fail "
                       "threshold; most on chat-1: 0.60 against 0.10)"]
    long["generations"].append({"prompt": "chat-2", "reference": {"repetition": 0.5}, "quantized": {"repetition": 0.4}})
    assert longrange.verdicts(long, ValidateThresholds())[0] == "warn"  # +0.2 on average: one loop is not a fail alone
