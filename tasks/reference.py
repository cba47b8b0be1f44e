"""Reference step: the unquantized model, loaded once per run and measured for every recipe to
compare with (its validation measurements are cached across runs by checkpoint hash)."""
from __future__ import annotations

from pathlib import Path

from prefect import task

from quantgate import modeling
from quantgate.config import EvaluateSettings, ValidateSettings
from tasks.evaluate import reference_evaluation
from tasks.validate import reference_stats


def reference(checkpoint: str, checkpoint_sha256: str, dtype: str, device: str, cache_dir: str,
              validate_settings: dict, evaluate_settings: dict) -> dict:
    from transformers import AutoTokenizer

    model = modeling.load(checkpoint, dtype, modeling.resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with modeling.timed("reference measurements"):
        validate = reference_stats(model, tokenizer, checkpoint_sha256, dtype, Path(cache_dir),
                                   ValidateSettings.model_validate(validate_settings))
    evaluate = reference_evaluation(model, tokenizer, checkpoint_sha256, dtype, Path(cache_dir),
                                    EvaluateSettings.model_validate(evaluate_settings))
    return {"real_bytes": modeling.real_bytes(model), "dtype": dtype,
            "footprint_reported_by_transformers": model.get_memory_footprint(), "validate": validate,
            "evaluate": evaluate}


reference_task = task(reference, name="reference")
