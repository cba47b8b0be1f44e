"""The towers of a multimodal checkpoint, validated on the image and audio prompts of data/multimodal: a tiny
random Gemma 3 (SigLIP vision tower, projector) and a tiny random Gemma 4 (vision and audio towers whose
Linear layers sit in Gemma4ClippableLinear), each with a working processor: SmolLM2's tokenizer plus the
model's image (and audio) tokens."""
import json
import subprocess
import sys

import pytest
import torch

from quantgate import modeling
from quantgate.config import load_config
from quantgate.settings import ValidateSettings
from quantgate.processors import gemma4_without_video, load_processor
from quantgate import drift, towers
from quantgate.results import ReferenceValidation
from tasks import quantize as quantize_step
from tasks import validate as validate_step
from tests.conftest import COMPUTE, PROJECT, edited_copy

SETTINGS = ValidateSettings(max_new_tokens=4)
NF4 = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[bnb-nf4]"]).recipes[0]
INT8 = load_config(PROJECT / "configs" / "default.yaml", ["recipes=[bnb-int8]"]).recipes[0]


@pytest.fixture(scope="module")
def gemma3_vision(smollm2, tmp_path_factory):
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder = tmp_path_factory.mktemp("towers") / "gemma3-vision"
    tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tokenizer = AutoTokenizer.from_pretrained(smollm2, extra_special_tokens=tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=64)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=56, patch_size=14, vision_use_head=False)  # as in Gemma 3
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=ids["boi_token"], eoi_token_index=ids["eoi_token"],
                          image_token_index=ids["image_token"])
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises the projector to zeros: a trained one is not
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(folder)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 56, "width": 56}), tokenizer=tokenizer,
                    image_seq_length=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gemma4_vision_audio(smollm2, tmp_path_factory):
    """Gemma 4 with clipped linears in both towers (as Gemma 4 E4B's audio tower has them)."""
    from transformers import AutoTokenizer, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig
    from transformers.models.gemma4.configuration_gemma4 import Gemma4AudioConfig, Gemma4VisionConfig
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    folder = tmp_path_factory.mktemp("towers") / "gemma4-vision-audio"
    tokens = {"image_token": "<|image|>", "boi_token": "<|image_start|>", "eoi_token": "<|image_end|>",
              "audio_token": "<|audio|>", "boa_token": "<|audio_start|>", "eoa_token": "<|audio_end|>"}
    tokenizer = AutoTokenizer.from_pretrained(smollm2, extra_special_tokens=tokens)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}
    text = Gemma4TextConfig(vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=128,
                            intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=64, global_head_dim=64, layer_types=["sliding_attention", "full_attention"],
                            sliding_window=64, hidden_size_per_layer_input=0)
    vision = Gemma4VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=32, use_clipped_linears=True)
    audio = Gemma4AudioConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, output_proj_dims=64)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio, video_token_id=ids["image_token"],
                          boi_token_id=ids["boi_token"], eoi_token_id=ids["eoi_token"], image_token_id=ids["image_token"],
                          boa_token_id=ids["boa_token"], eoa_token_index=ids["eoa_token"], audio_token_id=ids["audio_token"])
    torch.manual_seed(0)
    Gemma4ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(folder)
    gemma4_without_video()(feature_extractor=Gemma4AudioFeatureExtractor(), tokenizer=tokenizer,
                           image_processor=Gemma4ImageProcessorPil(max_soft_tokens=70)).save_pretrained(folder)
    return folder


def measured_reference(folder, cache_dir):
    from transformers import AutoTokenizer

    model = modeling.load(folder, COMPUTE, "cpu")
    stats = drift.reference_stats(model, AutoTokenizer.from_pretrained(folder), folder.name, COMPUTE, cache_dir,
                                  SETTINGS, "bfloat16")
    stats["towers"] = towers.reference_towers(model, load_processor(folder), cache_dir / f"{folder.name}-towers.pt",
                                              SETTINGS.max_new_tokens)
    return stats


@pytest.fixture(scope="module")
def reference(gemma3_vision, cache_dir):
    return measured_reference(gemma3_vision, cache_dir)


@pytest.fixture(scope="module")
def reference4(gemma4_vision_audio, cache_dir):
    return measured_reference(gemma4_vision_audio, cache_dir)


def check(checkpoint, recipe, reference):
    """The validate step as the flow calls it: the bf16 checkpoint computed in COMPUTE, its range bf16's."""
    return validate_step.validate(str(checkpoint), recipe, ReferenceValidation(**reference), "cpu", SETTINGS, COMPUTE,
                                  "bfloat16").model_dump()


def test_nf4_with_the_towers_skipped_keeps_what_the_tower_sees(gemma3_vision, reference, tmp_path):
    recipe = NF4.model_copy(update={"skip": ["model.vision_tower", "model.multi_modal_projector"]})
    quantized = quantize_step.quantize(str(gemma3_vision), recipe, "bfloat16", "cpu", str(tmp_path), 0.9).model_dump()
    assert quantized["status"] == "ok", quantized.get("reason")
    assert quantized["towers"]["model.vision_tower"]["quantized"] == 0
    result = check(quantized["checkpoint"], recipe, reference)
    vision = result["towers"]["model.vision_tower"]
    assert vision["prompts"] == len(towers.prompts("image")) == 14
    assert vision["embedding_cosine_min"] > 0.999 and vision["verdict"] in ("pass", "warn")
    assert len(vision["answers"]) == 14 and {"prompt", "reference", "quantized"} <= set(vision["answers"][0])

    quantized_tower = quantize_step.quantize(str(gemma3_vision), NF4, "bfloat16", "cpu",
                                             str(tmp_path / "all"), 0.9).model_dump()
    assert quantized_tower["towers"]["model.vision_tower"]["quantized"] > 0
    lower = check(quantized_tower["checkpoint"], NF4, reference)["towers"]["model.vision_tower"]
    assert lower["embedding_cosine_min"] < vision["embedding_cosine_min"]


def test_a_projector_that_hands_over_a_constant_fails_where_the_text_check_passes(gemma3_vision, reference, tmp_path):
    def grey(weights):  # whatever the image, the language model receives the same (zero) embeddings
        weights["multi_modal_projector.mm_input_projection_weight"].zero_()  # the checkpoint's own key

    result = check(edited_copy(gemma3_vision, tmp_path / "edited", grey), INT8, reference)
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0  # the text prompts see nothing wrong
    assert result["verdict"] == "fail" and result["towers"]["model.vision_tower"]["verdict"] == "fail"
    assert result["reason"].startswith("model.vision_tower: embedding cosine 0.0 < 0.95 (fail)")  # the 8-bit family


@pytest.mark.integration  # tiny models, but 45-50 s each on the 2-core CPU: more than the fast tier's share
@pytest.mark.parametrize("model, ref, tower, module", [
    ("gemma3_vision", "reference", "model.vision_tower", "vision_tower.encoder.layers.1.mlp.fc1"),
    ("gemma4_vision_audio", "reference4", "model.audio_tower", "model.audio_tower.layers.1.feed_forward1.ffw_layer_1.linear"),
])
def test_nan_in_a_tower_linear_is_that_towers_first_nonfinite_module(model, ref, tower, module, request, tmp_path):
    def plant(weights):  # the checkpoint's own key (Gemma 3 saves its modules without the `model.` prefix)
        weights[module + ".weight"][3, 5] = float("nan")

    result = check(edited_copy(request.getfixturevalue(model), tmp_path / "edited", plant), INT8, request.getfixturevalue(ref))
    assert result["towers"][tower]["first_nonfinite_module"] == module.removeprefix("model.").join(("model.", ""))
    assert all(t["first_nonfinite_module"] is None for name, t in result["towers"].items() if name != tower)
    assert result["verdict"] == "fail" and result["first_nonfinite_module"] is None  # the text never ran the tower
    assert f"{tower}: non-finite output from model." in result["reason"]


def test_the_report_shows_each_tower_and_both_answers(gemma3_vision, reference, tmp_path, golden_run):
    """A real tower result, in the golden run record, rendered as report.md renders it."""
    from quantgate.report import render_report

    def grey(weights):
        weights["multi_modal_projector.mm_input_projection_weight"].zero_()

    result = check(edited_copy(gemma3_vision, tmp_path / "edited", grey), INT8, reference)
    metrics = json.loads((golden_run / "metrics.json").read_text())
    metrics["recipes"]["bnb-nf4"]["validate"]["towers"] = result["towers"]
    report = render_report(metrics)
    assert "## bnb-nf4: model.vision_tower (fail)" in report
    assert "Embedding cosine mean 0.0000, min 0.0000;" in report
    first = result["towers"]["model.vision_tower"]["answers"][0]
    assert f"| {first['prompt']} | " in report and "| image prompt | reference | bnb-nf4 |" in report


def test_the_history_and_dashboard_carry_the_worst_tower(gemma3_vision, reference, tmp_path, golden_run):
    """The grey-projector result in a copy of the golden run, recorded and rendered as the nightly does it."""
    from quantgate import dashboard, history

    def grey(weights):
        weights["multi_modal_projector.mm_input_projection_weight"].zero_()

    result = check(edited_copy(gemma3_vision, tmp_path / "edited", grey), INT8, reference)
    run = golden_run
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["recipes"]["bnb-nf4"]["validate"]["towers"] = result["towers"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    db = tmp_path / "history.sqlite"
    history.record_run(db, run)
    cell = history.cells(db, recipe="bnb-nf4")[0]
    assert (cell["tower"], cell["tower_cosine"]) == ("model.vision_tower", 0.0)
    assert history.cells(db, recipe="torchao-int8-weight-only")[0]["tower"] is None  # text only in this record
    page = dashboard.render(db)
    assert "vision_tower cos 0.000" in page and page.count("worst tower&#x27;s embedding cosine") == 1


def test_the_card_has_a_vision_and_audio_section(gemma3_vision, reference, tmp_path, golden_run):
    """The quantize and validate results of nf4 with the tower skipped, in a copy of the golden run."""
    from quantgate.card import render_card

    recipe = NF4.model_copy(update={"skip": ["model.vision_tower", "model.multi_modal_projector"]})
    quantized = quantize_step.quantize(str(gemma3_vision), recipe, "bfloat16", "cpu",
                                       str(tmp_path / "q"), 0.9).model_dump()
    checked = check(quantized["checkpoint"], recipe, reference)
    run = golden_run
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["recipes"]["bnb-nf4"]["quantize"]["towers"] = quantized["towers"]
    metrics["recipes"]["bnb-nf4"]["validate"]["towers"] = checked["towers"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    card = render_card(run, "bnb-nf4")
    assert "## Vision and audio" in card
    assert "- model.vision_tower: 0 of 12 quantized (skip pattern 'model.vision_tower')" in card
    assert "- model.vision_tower: pass on 14 image prompts; embedding cosine to the reference's mean 1.0000" in card


# Gemma 4 E4B's recipe from its seed config: both towers and both projectors skipped.
E4B = load_config(PROJECT / "configs" / "gemma4-e4b-it.yaml").recipes[0]


def test_gemma4_towers_skipped_keep_both_senses_and_quantized_lower_them(gemma4_vision_audio, reference4, tmp_path):
    quantized = quantize_step.quantize(str(gemma4_vision_audio), E4B, "bfloat16", "cpu", str(tmp_path), 0.9).model_dump()
    assert quantized["status"] == "ok", quantized.get("reason")
    assert {t: c["quantized"] for t, c in quantized["towers"].items()} == {
        "model.vision_tower": 0, "model.audio_tower": 0, "model.embed_vision": 0, "model.embed_audio": 0}
    result = check(quantized["checkpoint"], E4B, reference4)
    vision, audio = result["towers"]["model.vision_tower"], result["towers"]["model.audio_tower"]
    assert (vision["kind"], vision["prompts"], audio["kind"], audio["prompts"]) == ("image", 14, "audio", 4)
    assert min(vision["embedding_cosine_min"], audio["embedding_cosine_min"]) > 0.999
    assert vision["verdict"] != "fail" and audio["verdict"] != "fail"
    assert [a["prompt"] for a in audio["answers"]] == ["tone-low", "tone-high", "spoken-seven", "spoken-orange"]

    every = E4B.model_copy(update={"skip": []})
    quantized_towers = quantize_step.quantize(str(gemma4_vision_audio), every, "bfloat16", "cpu",
                                              str(tmp_path / "all"), 0.9).model_dump()
    assert quantized_towers["towers"]["model.vision_tower"]["quantized"] > 0
    lower = check(quantized_towers["checkpoint"], every, reference4)["towers"]
    assert lower["model.vision_tower"]["embedding_cosine_min"] < vision["embedding_cosine_min"]
    assert lower["model.audio_tower"]["embedding_cosine_min"] < audio["embedding_cosine_min"]


def test_gemma4_collapsed_clip_bounds_fail_the_vision_tower_where_the_text_check_passes(gemma4_vision_audio,
                                                                                       reference4, tmp_path):
    def collapse(weights):  # every clipped linear of the vision tower clamps its output to [0, 0]
        for key in weights:
            if key.startswith("model.vision_tower.") and key.endswith(("output_min", "output_max")):
                weights[key].zero_()

    result = check(edited_copy(gemma4_vision_audio, tmp_path / "edited", collapse), INT8, reference4)
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0  # the text prompts see nothing wrong
    assert result["towers"]["model.vision_tower"]["verdict"] == "fail"
    assert result["towers"]["model.audio_tower"]["embedding_cosine_min"] > 0.999  # the audio tower is untouched
    assert result["verdict"] == "fail" and result["reason"].startswith("model.vision_tower: embedding cosine 0.")


def test_quantgate_plan_prints_each_towers_counts(gemma4_vision_audio, tmp_path):
    config = tmp_path / "gemma4.yaml"
    config.write_text(f"model: {{source: {gemma4_vision_audio}}}\nrecipes:\n"
                      "  - {use: bnb-nf4, skip: [model.vision_tower, model.embed_vision]}\n")
    done = subprocess.run([sys.executable, "-m", "quantgate.cli", "plan", str(config)], capture_output=True,
                          text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    assert "bnb-nf4: model.vision_tower: 0 of 15 quantized (skip pattern 'model.vision_tower')" in done.stdout
    assert "bnb-nf4: model.audio_tower: " in done.stdout and "bnb-nf4: model.embed_audio: 1 of 1 quantized" in done.stdout


def test_the_remedy_of_nf4_with_a_blind_vision_tower_keeps_the_tower_and_its_projector(gemma4_vision_audio, reference4,
                                                                                      tmp_path):
    """Seed 001's shape: nf4 with the towers quantized, the vision tower's clipped linears collapsed in its checkpoint
    (whatever the image, the tower hands over the same embeddings). The recipe fails on the tower; the remedy keeps
    the failing towers with their projectors, and that recipe, quantized again, passes."""
    from quantgate import cli
    from tests.test_remedy import make_run

    def collapse(weights):
        for key in weights:
            if key.startswith("model.vision_tower.") and key.endswith(("output_min", "output_max")):
                weights[key].zero_()

    # A random model's top-1 flips on noise (its logits are nearly flat): KL and the towers are the measure here.
    run, measured = make_run(gemma4_vision_audio, "{use: bnb-nf4, skip: [], thresholds: {top1_warn: 0, top1_fail: 0}}",
                             tmp_path, dtype="bfloat16", damage=collapse, reference=reference4,
                             overrides=(f"steps.validate.max_new_tokens={SETTINGS.max_new_tokens}",))
    failing = [t for t, m in measured["towers"].items() if m["verdict"] != "pass"]
    assert measured["verdict"] == "fail" and "model.vision_tower" in failing
    assert cli.main(["remedy", str(run), "bnb-nf4", "--budget", "1.0"]) == 0
    found = json.loads((run / "bnb-nf4" / "remedy.json").read_text())
    assert found["attribution"] is None  # the text prompts' drift passes: no module to rank
    kept = load_config(run / "bnb-nf4" / "remedy.yaml").recipes[0].skip
    assert {"model.vision_tower", "model.embed_vision"} <= set(kept)
    assert set(kept) == {*failing, *(["model.embed_audio"] if "model.audio_tower" in failing else []), "model.embed_vision"}
    assert found["gated"]["tried"][0]["verdict"] == "pass" and found["gated"]["chosen"] == 1
    plan = json.loads((run / "bnb-nf4" / "remedy" / "1" / "plan.json").read_text())
    assert all(e["status"] == "skipped" for e in plan["modules"] if e["module"].startswith("model.vision_tower."))


def test_a_vision_tower_blind_to_its_image_fails_even_against_itself(gemma4_vision_audio, reference4, tmp_path):
    """The tower made input-blind (its patches' pixels zeroed out of it: every image becomes its position
    embeddings, the same for every 224x224 image) and gated against itself: cosine 1 and KL 0, and still a fail."""
    def blind(weights):
        weights["model.vision_tower.patch_embedder.input_proj.weight"].zero_()

    folder = edited_copy(gemma4_vision_audio, tmp_path / "blind", blind)
    result = check(folder, INT8, measured_reference(folder, tmp_path / "cache"))
    vision, audio = result["towers"]["model.vision_tower"], result["towers"]["model.audio_tower"]
    assert vision["embedding_cosine_min"] > 0.9999 and vision["kl_mean"] < 1e-6  # itself, in every figure of today
    assert vision["input_dependence"] == vision["reference_input_dependence"] < towers.BLIND_FLOOR
    assert vision["verdict"] == "fail" and result["verdict"] == "fail"
    assert result["reason"].startswith("model.vision_tower: blind: what it hands over no longer depends on the image")
    assert audio["verdict"] == "pass" and audio["input_dependence"] > towers.BLIND_FLOOR
    seeing = towers.input_dependence(torch.load(reference4["towers"]["path"], weights_only=True)["image"])
    assert seeing > 100 * towers.BLIND_FLOOR  # the unedited tower moves with its image
