"""Reference step: the unquantized model, loaded once per run and measured for every recipe to compare with (its
validation and evaluation are cached across runs by checkpoint hash)."""
from __future__ import annotations

import time
from pathlib import Path

from quantgate import drift, longrange, modeling, towers
from quantgate.evaluations import lmeval
from quantgate.processors import load_processor
from quantgate.results import Downloaded, Reference, ReferenceEvaluation, ReferenceValidation
from quantgate.settings import EvaluateSettings, ValidateSettings


def reference(download: Downloaded, dtype: str, compute_dtype: str, device: str | dict, cache_dir: str,
              validate: ValidateSettings, evaluate: EvaluateSettings) -> Reference:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = modeling.load(download.checkpoint, compute_dtype, modeling.resolve_device(device))
    tokenizer = AutoTokenizer.from_pretrained(download.checkpoint)
    t1 = time.perf_counter()
    with modeling.timed("reference measurements"):
        measured = measure_validation(model, tokenizer, download, compute_dtype, dtype, Path(cache_dir), validate)
    t2 = time.perf_counter()
    # A base that goes non-finite has no scores worth the evaluation's minutes: the run stops at it.
    broken = measured.nonfinite or measured.overflow
    evaluation = ReferenceEvaluation(not_run="the reference goes non-finite") if broken else \
        ReferenceEvaluation(**lmeval.reference_evaluation(model, tokenizer, download.checkpoint_sha256, compute_dtype,
                                                          Path(cache_dir), evaluate))
    # Bytes as the checkpoint holds them: a float32 compute copy is not what a recipe is compared with.
    return Reference(real_bytes=modeling.real_bytes(model, as_dtype=dtype), dtype=dtype,
                     devices=modeling.devices_of(model), compute_dtype=modeling.computed_dtype(model),
                     validate=measured, evaluate=evaluation, load_s=round(t1 - t0, 2), validate_s=round(t2 - t1, 2),
                     evaluate_s=round(time.perf_counter() - t2, 2))


def measure_validation(model, tokenizer, download: Downloaded, compute_dtype: str, served: str, cache_dir: Path,
                       settings: ValidateSettings) -> ReferenceValidation:
    """The validation prompts' measurements, the long sequences' and, for a multimodal model, its image and audio
    prompts' beside them."""
    measured = ReferenceValidation(**drift.reference_stats(model, tokenizer, download.checkpoint_sha256,
                                                           compute_dtype, cache_dir, settings, served))
    measured.long = longrange.reference_long(model, tokenizer, Path(measured.path).with_name(longrange.cache_name(settings)),
                                             settings)
    if towers.senses(model):
        measured.towers = towers.reference_towers(model, load_processor(download.checkpoint),
                                                  Path(measured.path).with_name(towers.cache_name()),
                                                  settings.max_new_tokens)
    return measured
