"""The vision tower of a multimodal checkpoint, validated on the image prompts of data/multimodal: a tiny
random Gemma 3 (SigLIP tower, projector) with a working processor, SmolLM2's tokenizer plus image tokens."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate import modeling
from quantgate.config import ValidateSettings, load_config
from tasks import quantize as quantize_step
from tasks import towers
from tasks import validate as validate_step
from tests.conftest import PROJECT

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
def reference(gemma3_vision, cache_dir):
    from transformers import AutoProcessor, AutoTokenizer

    model = modeling.load(gemma3_vision, "bfloat16", "cpu")
    stats = validate_step.reference_stats(model, AutoTokenizer.from_pretrained(gemma3_vision), "gemma3-vision",
                                          "bfloat16", cache_dir, SETTINGS)
    stats["towers"] = towers.reference_towers(model, AutoProcessor.from_pretrained(gemma3_vision),
                                              cache_dir / "gemma3-vision-towers.pt", SETTINGS.max_new_tokens)
    return stats


def edited(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    weights = load_file(copy / "model.safetensors")
    edit(weights)
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def check(checkpoint, recipe, reference):
    return validate_step.validate(str(checkpoint), recipe.model_dump(), reference, "cpu", SETTINGS.model_dump())


def test_nf4_with_the_towers_skipped_keeps_what_the_tower_sees(gemma3_vision, reference, tmp_path):
    recipe = NF4.model_copy(update={"skip": ["model.vision_tower", "model.multi_modal_projector"]})
    quantized = quantize_step.quantize(str(gemma3_vision), recipe.model_dump(), "bfloat16", "cpu", str(tmp_path), 0.9)
    assert quantized["status"] == "ok", quantized.get("reason")
    assert quantized["towers"]["model.vision_tower"]["quantized"] == 0
    result = check(quantized["checkpoint"], recipe, reference)
    vision = result["towers"]["model.vision_tower"]
    assert vision["prompts"] == len(towers.image_prompts()) == 14
    assert vision["embedding_cosine_min"] > 0.999 and vision["verdict"] in ("pass", "warn")
    assert len(vision["answers"]) == 14 and {"prompt", "reference", "quantized"} <= set(vision["answers"][0])

    quantized_tower = quantize_step.quantize(str(gemma3_vision), NF4.model_dump(), "bfloat16", "cpu",
                                             str(tmp_path / "all"), 0.9)
    assert quantized_tower["towers"]["model.vision_tower"]["quantized"] > 0
    lower = check(quantized_tower["checkpoint"], NF4, reference)["towers"]["model.vision_tower"]
    assert lower["embedding_cosine_min"] < vision["embedding_cosine_min"]


def test_a_projector_that_hands_over_a_constant_fails_where_the_text_check_passes(gemma3_vision, reference, tmp_path):
    def grey(weights):  # whatever the image, the language model receives the same (zero) embeddings
        weights["multi_modal_projector.mm_input_projection_weight"].zero_()  # the checkpoint's own key

    result = check(edited(gemma3_vision, tmp_path, grey), INT8, reference)
    assert result["kl_mean"] < 1e-6 and result["top1_agreement"] == 1.0  # the text prompts see nothing wrong
    assert result["verdict"] == "fail" and result["towers"]["model.vision_tower"]["verdict"] == "fail"
    assert result["reason"].startswith("model.vision_tower: embedding cosine 0.0 < 0.9 (fail)")


def test_nan_in_a_vision_tower_linear_is_the_first_nonfinite_module(gemma3_vision, reference, tmp_path):
    def plant(weights):
        weights["vision_tower.encoder.layers.1.mlp.fc1.weight"][3, 5] = float("nan")

    result = check(edited(gemma3_vision, tmp_path, plant), INT8, reference)
    vision = result["towers"]["model.vision_tower"]
    assert vision["first_nonfinite_module"] == "model.vision_tower.encoder.layers.1.mlp.fc1"
    assert result["verdict"] == "fail" and result["first_nonfinite_module"] is None  # the text never ran the tower


def test_the_report_shows_each_tower_and_both_answers(gemma3_vision, reference, tmp_path, run_dir):
    """A real tower result, in the session flow run's record, rendered as report.md renders it."""
    import json

    from quantgate.record import render_report

    def grey(weights):
        weights["multi_modal_projector.mm_input_projection_weight"].zero_()

    result = check(edited(gemma3_vision, tmp_path, grey), INT8, reference)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["recipes"]["bnb-nf4"]["validate"]["towers"] = result["towers"]
    report = render_report(metrics)
    assert "## bnb-nf4: model.vision_tower (fail)" in report
    assert "Embedding cosine mean 0.0000, min 0.0000;" in report
    first = result["towers"]["model.vision_tower"]["answers"][0]
    assert f"| {first['prompt']} | " in report and "| image prompt | reference | bnb-nf4 |" in report


def test_the_card_has_a_vision_and_audio_section(gemma3_vision, reference, tmp_path, run_dir):
    """The quantize and validate results of nf4 with the tower skipped, in a copy of the session's run."""
    import json

    from quantgate.card import render_card

    recipe = NF4.model_copy(update={"skip": ["model.vision_tower", "model.multi_modal_projector"]})
    quantized = quantize_step.quantize(str(gemma3_vision), recipe.model_dump(), "bfloat16", "cpu",
                                       str(tmp_path / "q"), 0.9)
    checked = check(quantized["checkpoint"], recipe, reference)
    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoint"))
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["recipes"]["bnb-nf4"]["quantize"]["towers"] = quantized["towers"]
    metrics["recipes"]["bnb-nf4"]["validate"]["towers"] = checked["towers"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    card = render_card(run, "bnb-nf4")
    assert "## Vision and audio" in card
    assert "- model.vision_tower: 0 of 12 quantized (skip pattern 'model.vision_tower')" in card
    assert "- model.vision_tower: pass on 14 image prompts; embedding cosine to the reference's mean 1.0000" in card
