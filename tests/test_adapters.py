"""LoRA adapters served on a recipe's quantized base: checked against the model's module tree before any weight
is loaded, then measured on the reference and on each recipe (quantgate/adapters.py, tasks/adapters.py). The
adapters are made here with peft, their B matrices set (peft starts them at zero: no effect)."""
import json
from pathlib import Path

import pytest
import torch

from quantgate import adapters, drift, modeling
from quantgate.config import ConfigError, load_config
from quantgate.plan import make_plans
from quantgate.results import ReferenceValidation
from quantgate.settings import AdapterSpec, ValidateSettings
from tasks.adapters import check_adapters
from tasks.quantize import quantize
from tasks.reference import measure_adapter
from tests.conftest import COMPUTE, PROJECT, SHORT_PROMPTS, SUBJECTS, edited_copy, make_lora, write_config

SETTINGS = ValidateSettings(generate_prompts=1, max_new_tokens=4, long_context=None)


def adapter_config(tmp_path, source, adapter_source, recipes="[torchao-int8-weight-only]"):
    return write_config(tmp_path / "run.yaml", f"model:\n  source: {source}\nrecipes: {recipes}\n"
                                               f"adapters:\n  - {{name: style, source: {adapter_source}}}\n"
                                               f"output:\n  cache_dir: {tmp_path / 'cache'}\n")


@pytest.fixture(scope="module")
def tiny(tiny_tokenizer, tmp_path_factory):
    """A two-layer random Llama whose vocabulary is its tokenizer's 1,024 tokens: full logits stay small."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)).save_pretrained(folder)
    for file in tiny_tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    return make_lora(tiny, tmp_path_factory.mktemp("lora") / "style", ["q_proj", "v_proj"], 0.05)


def test_an_adapter_that_fits_plans_and_one_that_does_not_is_a_config_error(tiny, lora, tmp_path, capsys):
    from quantgate import cli

    assert cli.main(["plan", str(config := adapter_config(tmp_path, tiny, lora))]) == 0
    assert f"adapter style: LoRA of rank 8 on 4 modules (q_proj, v_proj), from {lora}" in capsys.readouterr().out
    raw = json.loads((lora / "adapter_config.json").read_text())
    raw["target_modules"] = ["q_proj", "vproj"]
    (lora / "adapter_config.json").write_text(json.dumps(raw))
    try:
        with pytest.raises(ConfigError) as e:
            make_plans(load_config(config), config)
    finally:
        (lora / "adapter_config.json").write_text(json.dumps({**raw, "target_modules": ["q_proj", "v_proj"]}))
    assert str(e.value) == (f"{lora / 'adapter_config.json'}: target_modules: adapter style (adapters[0]): 'vproj' "
                            "matches no module of LlamaForCausalLM; did you mean 'v_proj'?")


def test_an_adapter_for_another_base_or_no_adapter_at_all_is_refused_before_loading(tiny, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = tmp_path / "wider"
    LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(wider)
    other = make_lora(wider, tmp_path / "other", ["q_proj"], 0.05)
    config = adapter_config(tmp_path, tiny, other)
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(config), config)
    assert e.value.field == "adapters[0].source" and "model.layers.0.self_attn.q_proj: the adapter's lora_A is 8x96 " \
        "and lora_B 96x8, but the layer is 64x64 (an adapter for another base model?)" in str(e.value)
    config = adapter_config(tmp_path, tiny, tmp_path / "nothing-here")
    with pytest.raises(ConfigError) as e:
        make_plans(load_config(config), config)
    assert f"adapters[0].source: style: {tmp_path / 'nothing-here'} has no adapter_config.json or " \
           "adapter_model.safetensors" in str(e.value)
    with pytest.raises(ConfigError, match=r"adapters\[0\]\.source: .*'hf:just-a-name': a Hub adapter is hf:ORG/NAME"):
        load_config(adapter_config(tmp_path, tiny, "hf:just-a-name"))


def test_gemma4_clipped_linears_are_refused_with_the_name_inside():
    """Gemma 4's towers wrap each Linear in Gemma4ClippableLinear, which peft cannot adapt: `q_proj` names the
    wrapper (and the language model's plain q_proj), `q_proj.linear` the Linear inside."""
    from peft import LoraConfig

    skeleton = modeling.skeleton(gemma4_config())
    (problem,) = adapters.target_problems(LoraConfig(target_modules=["q_proj"]), skeleton)
    assert problem == ("'q_proj' matches 2 modules peft cannot adapt, such as "
                       "model.vision_tower.encoder.layers.0.self_attn.q_proj (Gemma4ClippableLinear); the layer inside "
                       "is 'q_proj.linear': target that")
    assert adapters.target_problems(LoraConfig(target_modules=["q_proj.linear"]), skeleton) == []


def test_gemma4_with_its_clipped_linears_targeted_inside_is_gated_and_recorded(tiny_tokenizer, tmp_path):
    """The tiny Gemma 4 with a LoRA on the Linear inside each clipped q_proj (`q_proj.linear`, as seed 001 had to
    name it): planned without a problem, measured on the reference and gated on torchao int8, its block recorded.
    The adapter adapts the vision tower only, so the text prompts see no decided token and nothing is judged."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import Gemma4ForConditionalGeneration
    from transformers import AutoTokenizer

    folder, cache = tmp_path / "gemma4", tmp_path / "cache"
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(gemma4_config()).save_pretrained(folder)
    for file in tiny_tokenizer.iterdir():
        shutil.copy(file, folder / file.name)
    model = modeling.load(folder, "float32", "cpu")
    adapted = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj.linear"]))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapted.save_pretrained(tmp_path / "vision-lora")
    config = adapter_config(tmp_path, folder, tmp_path / "vision-lora")
    make_plans(load_config(config), config)
    model = modeling.load(folder, COMPUTE, "cpu")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = ReferenceValidation(**drift.reference_stats(model, tokenizer, "gemma4", COMPUTE, cache, SETTINGS, "float32"))
    served = {"style": measure_adapter(model, tokenizer, AdapterSpec(name="style", source=str(tmp_path / "vision-lora")),
                                       base, cache, SETTINGS, "float32")}
    assert served["style"]["adapted_modules"] == 2 and served["style"]["effect"]["changed_tokens"] == 0
    recipe = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[torchao-int8-weight-only]"]).recipes[0]
    quantized = quantize(str(folder), recipe, "float32", "cpu", str(tmp_path / "int8"), roundtrip_min_top1=0.9,
                         cache_dir=str(cache))
    checked = check_adapters(quantized.checkpoint, recipe, served, base.path, "cpu", SETTINGS, COMPUTE, "float32")
    style = checked.adapters["style"]
    assert checked.status == "ok" and style["equivalence"]["reload"]["identical"], style["reasons"]
    assert style["notes"][-1] == "the adapter changes the reference's top-1 on 0 tokens only: too few to judge what survives"


def gemma4_config():
    """A tiny Gemma 4 whose vision tower wraps each Linear in Gemma4ClippableLinear; its text vocabulary is the tiny
    tokenizer's 1,024 tokens."""
    from transformers import Gemma4Config, Gemma4TextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4VisionConfig

    text = Gemma4TextConfig(vocab_size=1024, vocab_size_per_layer_input=1024, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                            global_head_dim=64, layer_types=["sliding_attention", "full_attention"], sliding_window=64,
                            hidden_size_per_layer_input=0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32, use_clipped_linears=True)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None)


@pytest.fixture(scope="module")
def measured(tiny, lora, tmp_path_factory):
    """The tiny Llama's reference measured without and with the adapter, and its int8 checkpoint."""
    from transformers import AutoTokenizer

    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("out")
    model, tokenizer = modeling.load(tiny, COMPUTE, "cpu"), AutoTokenizer.from_pretrained(tiny)
    base = ReferenceValidation(**drift.reference_stats(model, tokenizer, "tiny", COMPUTE, cache, SETTINGS, "float32"))
    served = {"style": measure_adapter(model, tokenizer, AdapterSpec(name="style", source=str(lora)), base, cache,
                                       SETTINGS, "float32")}
    recipe = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[torchao-int8-weight-only]"]).recipes[0]
    quantized = quantize(str(tiny), recipe, "float32", "cpu", str(out / "int8"), roundtrip_min_top1=0.9,
                         cache_dir=str(cache))
    return base, served, recipe, quantized.checkpoint


def test_the_reference_with_the_adapter_is_measured_and_left_without_it(measured, tiny):
    base, served, _, _ = measured
    style = served["style"]
    assert style["r"] == 8 and style["target_modules"] == ["q_proj", "v_proj"] and style["adapted_modules"] == 4
    assert style["effect"]["kl_mean"] > 0 and 0 < style["effect"]["changed_tokens"] < style["effect"]["tokens"]
    with_adapter, plain = torch.load(style["path"]), torch.load(base.path)
    assert not torch.equal(with_adapter["prompts"][0]["top_logp"], plain["prompts"][0]["top_logp"])


def test_int8_keeps_the_adapter_and_merge_unmerge_and_reload_agree(measured):
    base, served, recipe, checkpoint = measured
    checked = check_adapters(checkpoint, recipe, served, base.path, "cpu", SETTINGS, COMPUTE, "float32")
    style = checked.adapters["style"]
    assert checked.status == "ok" and style["verdict"] in ("pass", "warn"), style["reasons"]
    effect = style["effect"]
    assert effect["decided_tokens"] == served["style"]["effect"]["changed_tokens"]
    assert effect["kept"] > 0.9 and effect["kl_mean"] == pytest.approx(effect["kl_mean_reference"], rel=0.2)
    same = style["equivalence"]
    assert same["reload"]["identical"]
    assert same["merge"]["supported"] and same["merge"]["top1_agreement"] > 0.99
    assert same["unmerge"]["top1_agreement"] > 0.99


def test_a_base_that_loses_the_adapters_effect_fails_with_the_count(measured, tmp_path):
    """The recipe's checkpoint with noise planted in its (tied) embeddings: the adapter still loads, but the tokens it
    decides no longer follow it."""
    base, served, recipe, checkpoint = measured

    def noisy_embeddings(weights):
        torch.manual_seed(1)
        for name in [n for n in weights if "embed" in n]:
            weights[name] = weights[name] + torch.randn_like(weights[name]) * weights[name].std() * 3

    damaged = edited_copy(Path(checkpoint), tmp_path / "damaged", noisy_embeddings)
    checked = check_adapters(str(damaged), recipe, served, base.path, "cpu", SETTINGS, COMPUTE, "float32")
    style = checked.adapters["style"]
    assert checked.status == "failed" and style["verdict"] == "fail"
    n = style["effect"]["decided_tokens"]
    assert f"the adapter's effect is lost: of the {n} tokens whose top-1 the adapter changes in high precision" in checked.reason


def test_the_adapter_flow_gates_its_adapter_on_every_recipe_that_reaches_it(adapter_flow):
    """The adapter flow serves a LoRA trained on WikiText (conftest's smol_lora) on every recipe: measured on the
    reference once, then on each recipe that passed validation (not on bnb-int8, which errored at quantize), in the
    record, the report and the card."""
    from quantgate.card import render_card

    run_dir = adapter_flow
    m = json.loads((run_dir / "metrics.json").read_text())
    wiki = m["reference"]["adapters"]["wiki"]
    assert (wiki["r"], wiki["target_modules"], wiki["adapted_modules"]) == (8, ["q_proj", "v_proj"], 60)  # 30 layers
    assert 0 < wiki["effect"]["changed_tokens"] < wiki["effect"]["tokens"] and wiki["effect"]["kl_mean"] > 0
    gated = {name: e["adapters"]["wiki"] for name, e in m["recipes"].items() if e.get("adapters")}
    # bnb-int8 errored at quantize: it does not reach the adapters (a recipe failing validation stops before them
    # too, as before evaluate: tests/test_flow.py's int8-strict).
    assert sorted(gated) == ["fp8-block64", "torchao-int8-weight-only"] and m["recipes"]["bnb-int8"]["status"] == "error"
    for name, a in gated.items():
        assert m["recipes"][name]["steps"]["adapters"]["status"] == "ok", a["reasons"]
        # Both counted on the reference's own measurements, a tie for the top read alike (bf16 logits tie often).
        assert a["effect"]["decided_tokens"] == wiki["effect"]["changed_tokens"]
        assert a["effect"]["kl_mean"] > 0
        assert a["equivalence"]["reload"]["identical"]  # bnb's 4-bit layers are where it differs (the next test)
    # FP8's weights (three mantissa bits, a scale per 64x64 block) move the adapted model further than int8's (seven,
    # a scale per row), and keep fewer of the adapter's decisions.
    fp8, int8 = gated["fp8-block64"], gated["torchao-int8-weight-only"]
    assert fp8["kl_mean"] > 3 * int8["kl_mean"] and fp8["effect"]["kept"] <= int8["effect"]["kept"]
    # Evaluated with it: trained on WikiText-2's test text, it lowers the reference's perplexity there.
    ppl = lambda found: found["wikitext"]["word_perplexity"]  # noqa: E731
    assert ppl(wiki["evaluate"]) < ppl(m["reference"]["evaluate"]) and wiki["evaluate"]["mmlu"]["n"] == len(SUBJECTS)
    for name in gated:
        with_it = m["recipes"][name]["evaluate"]["adapters"]["wiki"]
        assert with_it["mmlu"]["paired_n"] == len(SUBJECTS) and with_it["joint"]["decision"]
        assert with_it["wikitext"]["delta_word_perplexity"] == pytest.approx(ppl(with_it) - ppl(wiki["evaluate"]))
        benched = m["recipes"][name]["benchmark"]["adapters"]["wiki"]  # 60 LoRA layers of rank 8 add their weights
        assert benched["status"] == "ok" and benched["real_bytes_added"] > 0 and benched["decode_ratio"] > 0
    report = (run_dir / "report.md").read_text()
    assert "## Adapters" in report and "| torchao-int8-weight-only | wiki | " in report
    assert "Evaluated with each adapter, against the reference with the same adapter:" in report
    assert "- torchao-int8-weight-only, wiki: decode " in report
    card = render_card(run_dir, "torchao-int8-weight-only")
    assert "## Served with adapters" in card and f"| wiki | {int8['verdict']} | {int8['kl_mean']:.4f} |" in card
    assert f"| wiki | {m['recipes']['torchao-int8-weight-only']['evaluate']['adapters']['wiki']['mmlu']['acc']:.3f} (" in card


def test_an_adapter_whose_effect_sits_below_the_quantization_error_is_flagged_on_nf4(run_dir, smollm2, tmp_path):
    """A weak adapter (random B at a small scale) decides tokens by margins that nf4's error overturns and int8's
    does not: flagged on nf4 with the count, kept on int8."""
    from transformers import AutoTokenizer

    m = json.loads((run_dir / "metrics.json").read_text())
    weak = make_lora(smollm2, tmp_path / "weak", ["q_proj", "v_proj", "o_proj", "down_proj"], 0.03)
    base = ReferenceValidation(**m["reference"]["validate"])
    settings = ValidateSettings(generate_prompts=1, max_new_tokens=8, long_context=None, prompts=SHORT_PROMPTS)
    model = modeling.load(smollm2, COMPUTE, "cpu")
    served = {"weak": measure_adapter(model, AutoTokenizer.from_pretrained(smollm2), AdapterSpec(name="weak",
                                      source=str(weak)), base, tmp_path, settings, "bfloat16")}
    del model
    config = load_config(run_dir / "config.yaml")
    found = {}
    for recipe in (r for r in config.recipes if r.name in ("bnb-nf4", "torchao-int8-weight-only")):
        found[recipe.name] = check_adapters(str(run_dir / recipe.name / "checkpoint"), recipe, served, base.path, "cpu",
                                            settings, COMPUTE, "bfloat16").adapters["weak"]
    nf4, int8 = found["bnb-nf4"], found["torchao-int8-weight-only"]
    assert nf4["effect"]["decided_tokens"] >= 20 and nf4["verdict"] in ("warn", "fail")
    assert any(r.startswith(("the adapter's effect weakens", "the adapter's effect is lost")) for r in nf4["reasons"])
    assert int8["effect"]["kept"] > nf4["effect"]["kept"]
    # bitsandbytes' 4-bit layers on a CPU with AVX512 change the base's own outputs when peft loads a second adapter
    # onto them (max |diff| 1.19 with both adapters off, measured): said, where it happens.
    assert int8["equivalence"]["reload"]["identical"]
    assert nf4["equivalence"]["reload"]["identical"] or any(
        n.startswith("the adapter saved and loaded again gives other logits") for n in nf4["notes"])


def test_the_evaluations_run_with_the_adapter_on_the_reference_and_on_the_recipe(measured, tiny, golden_run, tmp_path):
    """The reference with the adapter through the evaluations (cached by the adapter's files), then the int8
    checkpoint with the same adapter against it, beside the recipe's own: in the record, the report and the card."""
    from transformers import AutoTokenizer

    from quantgate.card import render_card
    from quantgate.evaluations import lmeval
    from quantgate.report import render_report
    from quantgate.results import ReferenceEvaluation
    from quantgate.settings import EvaluateSettings
    from tasks.evaluate import evaluate
    from tasks.reference import evaluate_adapter

    base, served, recipe, checkpoint = measured
    settings = EvaluateSettings(limit=1, batch_size=4, wikitext_token_budget=256)
    model, tokenizer = modeling.load(tiny, COMPUTE, "cpu"), AutoTokenizer.from_pretrained(tiny)
    plain = lmeval.reference_evaluation(model, tokenizer, "tiny", COMPUTE, tmp_path, settings)
    style = {**served["style"], "evaluate": evaluate_adapter(model, tokenizer, served["style"], "tiny", COMPUTE, tmp_path,
                                                             settings)}
    assert not any("lora" in name for name, _ in model.named_modules())  # left as it was
    assert style["evaluate"]["wikitext"]["word_perplexity"] != plain["wikitext"]["word_perplexity"]
    assert evaluate_adapter(model, tokenizer, served["style"], "tiny", COMPUTE, tmp_path, settings)["cached"]

    (tmp_path / "out").mkdir()
    found = evaluate(checkpoint, recipe, ReferenceEvaluation(**plain), "cpu", settings, str(tmp_path / "out"), COMPUTE,
                     {"style": style})
    with_it = found.adapters["style"]
    assert with_it["mmlu"]["n"] == found.mmlu["n"] == 57 and with_it["mmlu"]["paired_n"] == 57
    assert with_it["wikitext"]["word_perplexity"] != found.wikitext["word_perplexity"]
    assert with_it["wikitext"]["delta_word_perplexity"] == pytest.approx(
        with_it["wikitext"]["word_perplexity"] - style["evaluate"]["wikitext"]["word_perplexity"])
    assert with_it["joint"]["decision"] and (tmp_path / "out" / "evaluate-adapter-style.json").is_file()

    metrics = json.loads((golden_run / "metrics.json").read_text())
    metrics["reference"]["adapters"] = {"style": style}
    entry = metrics["recipes"]["torchao-int8-weight-only"]
    checked = check_adapters(checkpoint, recipe, served, base.path, "cpu", SETTINGS, COMPUTE, "float32")
    entry["adapters"], entry["evaluate"]["adapters"] = checked.adapters, found.model_dump(mode="json")["adapters"]
    (golden_run / "metrics.json").write_text(json.dumps(metrics))
    row = f"| torchao-int8-weight-only | style | {with_it['mmlu']['acc']:.3f} ({with_it['mmlu']['delta_acc']:+.3f} ["
    assert "Evaluated with each adapter, against the reference with the same adapter:" in render_report(metrics)
    assert row in render_report(metrics)
    card = render_card(golden_run, "torchao-int8-weight-only")
    assert "Evaluated with each adapter, against the unquantized model with the same adapter:" in card
    assert f"| style | {with_it['mmlu']['acc']:.3f} (" in card and f"| {with_it['joint']['decision']} |" in card


@pytest.mark.integration  # two measurement processes
def test_the_benchmark_measures_the_recipe_with_the_adapter_on_top(measured, lora, tmp_path):
    """The int8 checkpoint benchmarked alone and with the adapter loaded by peft on top, each in a process of its own:
    the adapter's weights and decode time added, in the record's block and the report's line."""
    from quantgate.formats import adapter_benchmark_lines
    from quantgate.settings import BenchmarkSettings
    from tasks.benchmark import benchmark

    _, _, recipe, checkpoint = measured
    settings = BenchmarkSettings(prompt_tokens=16, new_tokens=4, repeats=1, quantize_on_load=False)
    found = benchmark(recipe.name, checkpoint, recipe, "float32", "cpu", settings, str(tmp_path),
                      adapters_served={"style": str(lora)})
    assert found.status == "ok", found.reason
    style = found.adapters["style"]
    assert style["status"] == "ok" and style["adapter"] == str(lora) and style["loaded"] == checkpoint
    # Rank 8 on two layers' q_proj (64 to 64) and v_proj (64 to 32: two KV heads of 16), in float32.
    lora_bytes = 2 * ((8 * 64 + 64 * 8) + (8 * 64 + 32 * 8)) * 4
    assert style["real_bytes_added"] == lora_bytes
    assert style["decode_ratio"] == pytest.approx(
        style["latency"]["decode_ms_per_token"] / found.latency["decode_ms_per_token"], rel=1e-3)
    (line,) = adapter_benchmark_lines({"benchmark": found.model_dump(mode="json")})
    assert line.startswith(f"style: decode {style['latency']['decode_ms_per_token']:.2f} ms/token (") and "+0.0 MB" in line


@pytest.mark.integration  # two measurement processes
def test_an_adapter_on_a_model_offloaded_to_disk_is_measured_or_named(tiny, lora, tmp_path):
    """Under a max_memory that sends layers to disk (meta tensors until accelerate's hooks fetch them), peft 0.21.2
    cannot load the adapter on top (seed 001's `Tensor.item() cannot be called on meta tensors`): the model's own
    figures are recorded, and the adapter's measurement names that failure."""
    from quantgate.settings import BenchmarkSettings
    from tasks.benchmark import benchmark

    settings = BenchmarkSettings(prompt_tokens=16, new_tokens=3, repeats=1, max_memory={"cpu": "150KB"},
                                 offload_to_disk=True)
    found = benchmark("reference", str(tiny), None, "float32", "cpu", settings, str(tmp_path),
                      adapters_served={"style": str(lora)})
    assert found.status == "ok", found.reason
    assert found.model_dump()["placement"]["modules_by_device"]["disk"] > 0
    style = found.adapters["style"]
    assert style["status"] == "error" and "peft could not load the adapter onto a model offloaded in part (its " \
        "offloaded weights are meta tensors)" in style["reason"]
    assert any(w.startswith("adapter style: ") and "meta tensors" in w for w in found.warnings)
    # peft copies the offloaded weights to their absolute path made relative: into the measurement's folder, which
    # the process runs in, not the project's.
    assert not (PROJECT / tiny.relative_to("/").parts[0]).exists()
    assert (tmp_path / tiny.relative_to("/") / "model.safetensors").is_file()
