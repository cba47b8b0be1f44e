"""Reference step: the unquantized model, loaded once per run and measured for every recipe to
compare with (its validation and evaluation are cached across runs by checkpoint hash)."""
from __future__ import annotations

import time
from pathlib import Path

from prefect import task

from quantgate import modeling
from quantgate.config import EvaluateSettings, ValidateSettings
from quantgate.processors import load_processor
from tasks.evaluate import reference_evaluation
from tasks import towers
from tasks.validate import reference_stats


def reference(checkpoint: str, checkpoint_sha256: str, dtype: str, compute_dtype: str, device: str, cache_dir: str,
              validate_settings: dict, evaluate_settings: dict) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = modeling.load(checkpoint, compute_dtype, modeling.resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    t1 = time.perf_counter()
    with modeling.timed("reference measurements"):
        settings = ValidateSettings.model_validate(validate_settings)
        validate = reference_stats(model, tokenizer, checkpoint_sha256, compute_dtype, Path(cache_dir), settings)
        if towers.senses(model):  # the image and audio prompts, cached beside the text statistics
            validate["towers"] = towers.reference_towers(model, load_processor(checkpoint),
                                                         Path(validate["path"]).with_name(towers.cache_name()),
                                                         settings.max_new_tokens)
    t2 = time.perf_counter()
    # A base that goes non-finite has no scores worth the evaluation's minutes: the run stops at it.
    evaluate = {"not_run": "the reference goes non-finite"} if validate["nonfinite"] else reference_evaluation(
        model, tokenizer, checkpoint_sha256, compute_dtype, Path(cache_dir), EvaluateSettings.model_validate(evaluate_settings))
    # Bytes as the checkpoint holds them: a float32 compute copy is not what a recipe is compared with.
    return {"real_bytes": modeling.real_bytes(model, as_dtype=dtype), "dtype": dtype, "devices": modeling.devices_of(model),
            "compute_dtype": modeling.computed_dtype(model), "validate": validate, "evaluate": evaluate, "load_s": round(t1 - t0, 2), "validate_s": round(t2 - t1, 2),
            "evaluate_s": round(time.perf_counter() - t2, 2)}


reference_task = task(reference, name="reference")
