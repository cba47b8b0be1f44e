"""Validate step: where a recipe's checkpoint goes non-finite, how far its next-token distributions drift from the
reference's (quantgate.drift), its vision and audio towers (quantgate.towers), and whether it still generates.
Gives each recipe a verdict: pass, warn or fail."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from quantgate import drift, longrange, modeling, stored, towers
from quantgate.backends import RecipeBase
from quantgate.drift import SEVERITY, verdict
from quantgate.loading import kernel_of, load_saved
from quantgate.processors import load_processor
from quantgate.files import cached_tensors, save_tensors
from quantgate.results import Generated, ReferenceValidation, Validated
from quantgate.settings import ValidateSettings


def generate(checkpoint: str, recipe: RecipeBase, device: str | dict, settings: ValidateSettings, out_dir: str,
             compute_dtype: str = "auto") -> Generated:
    """A recipe's own greedy generations from the validation prompts, short and long, saved in `out_dir` for
    validate: they need nothing of the reference's, so a flow makes them while the reference is still measured."""
    from transformers import AutoTokenizer

    scanned = stored.scan(Path(checkpoint))
    if scanned.get("findings"):  # validate fails it before loading: nothing to generate for
        return Generated(status="not_run", reason="its stored tensors hold what no forward makes right")
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with modeling.timed(f"generate {recipe.name}"):
        made = {"short": drift.own_generations(model, tokenizer, settings), "stored": scanned,  # validate's, read once
                "long": longrange.own_generations(model, tokenizer, settings) if settings.long_context else []}
    return Generated(status="ok", path=str(save_tensors(Path(out_dir) / "generations.pt", made)))


def validate(checkpoint: str, recipe: RecipeBase, reference: ReferenceValidation, device: str | dict,
             settings: ValidateSettings, compute_dtype: str = "auto", served: str | None = None,
             generated: str | None = None) -> Validated:
    """Compare a recipe's saved checkpoint with the reference; the step's result with its verdict. `served`: the
    dtype the checkpoint is served in, whose range its activations must stay within whatever dtype computed.
    `generated`: the file of the recipe's own generations made before (generate), used where they fit."""
    from transformers import AutoTokenizer

    made = (cached_tensors(Path(generated)) or {}) if generated else {}  # unreadable: made here, as without it
    scanned = made.get("stored") or stored.scan(Path(checkpoint))
    if scanned.get("findings"):  # no forward makes these right: fail before loading
        return broken_storage(scanned, reference)
    stats = torch.load(reference.path, weights_only=True)  # the reference step wrote it this run, or checked it
    t0 = time.perf_counter()
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    load_s = round(time.perf_counter() - t0, 2)
    with modeling.timed(f"validate {recipe.name}"):
        metrics = drift.compare(model, tokenizer := AutoTokenizer.from_pretrained(checkpoint), stats, settings, served,
                                made_before=made.get("short"))
    metrics.update(compute_dtype=modeling.computed_dtype(model), load_s=load_s, stored=scanned, **kernel_of(recipe))
    result, reasons = verdict(metrics, recipe.thresholds)
    if reference.long:  # damage the short prompts miss: late positions, long generations
        with modeling.timed(f"validate {recipe.name} on long sequences"):
            metrics["long"] = longrange.compare(model, tokenizer, torch.load(reference.long["path"], weights_only=True),
                                                settings, made_before=made.get("long"))
        worst, long_reasons = longrange.verdicts(metrics["long"], recipe.thresholds)
        result = max(result, worst, key=SEVERITY.index)
        reasons += long_reasons
    if reference.towers:  # a multimodal model: its vision and audio towers, on their own prompts
        metrics["towers"] = towers.compare(model, load_processor(checkpoint), reference.towers, settings.max_new_tokens)
        worst, tower_reasons = towers.verdicts(metrics["towers"], recipe.thresholds)
        result = max(result, worst, key=SEVERITY.index)
        reasons += tower_reasons
    if result == "fail":
        reasons[:0] = base_broken(reference)
    failed = result == "fail"
    return Validated(status="failed" if failed else "ok", reason="; ".join(reasons) if failed else None,
                     warnings=reasons if result == "warn" else [], verdict=result, reasons=reasons, **metrics)


def base_broken(reference: ReferenceValidation) -> list[str]:
    """The reason that comes first where the reference itself goes non-finite."""
    if not reference.first_nonfinite_module:
        return []
    return [f"the reference itself goes non-finite from {reference.first_nonfinite_module} on: "
            "a broken base model, not a broken quantization"]


def broken_storage(scanned: dict, reference: ReferenceValidation) -> Validated:
    """A checkpoint whose stored tensors hold what no forward can make right: failed, with every finding kept."""
    reasons = [*base_broken(reference), stored.finding_reason(scanned)]
    return Validated(status="failed", reason="; ".join(reasons), verdict="fail", reasons=reasons, stored=scanned)
