"""Reference step: the unquantized model, loaded once per run and measured for every recipe to compare with (its
validation and evaluation are cached across runs by checkpoint hash)."""
from __future__ import annotations

import time
from pathlib import Path

from quantgate import adapters, drift, longrange, modeling, towers
from quantgate.evaluations import lmeval
from quantgate.files import cached_tensors, save_tensors, sha256_file
from quantgate.formats import error_line
from quantgate.nonfinite import nonfinite_reason, overflow_reason
from quantgate.processors import load_processor
from quantgate.results import Downloaded, Reference, ReferenceEvaluation, ReferenceValidation
from quantgate.settings import AdapterSpec, EvaluateSettings, ValidateSettings


def reference(download: Downloaded, dtype: str, compute_dtype: str, device: str | dict, cache_dir: str,
              validate: ValidateSettings, evaluate: EvaluateSettings, adapters_served: list[AdapterSpec] = ()) -> Reference:
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
    t3 = time.perf_counter()
    adapted = {} if broken else {spec.name: adapter_or_error(model, tokenizer, spec, measured, Path(cache_dir),
                                                             validate, dtype) for spec in adapters_served}
    for found in adapted.values() if evaluate.adapters else ():
        if "error" not in found:
            found["evaluate"] = evaluate_adapter(model, tokenizer, found, download.checkpoint_sha256, compute_dtype,
                                                 Path(cache_dir), evaluate)
    # Bytes as the checkpoint holds them: a float32 compute copy is not what a recipe is compared with.
    return Reference(adapters=adapted or None, adapters_s=round(time.perf_counter() - t3, 2) if adapted else None,
                     real_bytes=modeling.real_bytes(model, as_dtype=dtype), dtype=dtype,
                     devices=modeling.devices_of(model), compute_dtype=modeling.computed_dtype(model),
                     validate=measured, evaluate=evaluation, load_s=round(t1 - t0, 2), validate_s=round(t2 - t1, 2),
                     evaluate_s=round(t3 - t2, 2))


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


def evaluate_adapter(model, tokenizer, found: dict, checkpoint_sha256: str, compute_dtype: str, cache_dir: Path,
                     settings: EvaluateSettings) -> dict:
    """The reference with the adapter through the evaluations, cached as the reference's is, by the adapter's files
    too; the model is left as it was."""
    with adapters.attached(model, Path(found["folder"])) as adapted:
        return lmeval.reference_evaluation(adapted, tokenizer, f"{checkpoint_sha256}+{found['files_sha256']}",
                                           compute_dtype, cache_dir, settings)


def adapter_or_error(model, tokenizer, spec: AdapterSpec, measured: ReferenceValidation, cache_dir: Path,
                     settings: ValidateSettings, served: str) -> dict:
    """measure_adapter's figures, or why the reference with the adapter could not be measured or is broken (each
    recipe then says so for it instead of measuring it): one adapter's problem is not the run's."""
    try:
        found = measure_adapter(model, tokenizer, spec, measured, cache_dir, settings, served)
    except Exception as e:  # an offloaded reference peft cannot load onto, a file gone since the plan
        return {"source": spec.source, "error": error_line(e)}
    if broken := found["nonfinite"] or found["overflow"]:
        found["error"] = (f"the unquantized model with the adapter is broken: {nonfinite_reason(broken)}"
                          if found["nonfinite"] else f"the unquantized model with the adapter is broken where it is served: "
                          f"{overflow_reason(broken)}")
    return found


def measure_adapter(model, tokenizer, spec: AdapterSpec, measured: ReferenceValidation, cache_dir: Path,
                    settings: ValidateSettings, served: str) -> dict:
    """The reference with the adapter on top: its measurements on the validation prompts (cached by the adapter's
    files), what the adapter changes there, and the adapter's description; the model is left as it was."""
    folder = adapters.fetch(spec.source, cache_dir)
    sha = sha256_file(folder / "adapter_model.safetensors")[:16] + sha256_file(folder / "adapter_config.json")[:8]
    path = Path(measured.path).with_name(f"adapter-{sha}.pt")
    with adapters.attached(model, folder) as adapted:  # the LoRA layers out again after: the plain reference
        stats = cached_tensors(path) if path.is_file() else None
        if stats is None:
            stats = drift.measure_reference(adapted, tokenizer, settings, served)
            save_tensors(path, stats)
        effect = adapters.effect_on(adapted, stats["prompts"])
        config = adapted.peft_config[adapters.NAME]
        targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        described = {"r": config.r, "lora_alpha": config.lora_alpha, "target_modules": targets,
                     "base_model": config.base_model_name_or_path,
                     "adapted_modules": len(adapters.weight_shapes(folder))}
    return {"path": str(path), "folder": str(folder), "files_sha256": sha, "source": spec.source, **described, "effect": effect,
            "nonfinite": stats["nonfinite"], "overflow": stats.get("overflow"), "generations": stats["generations"]}
