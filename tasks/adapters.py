"""Adapters step: each LoRA adapter served on the model, loaded by peft on the recipe's saved checkpoint as a user
loads it, against the reference with the same adapter (quantgate/adapters.py): drift, non-finite outputs and
generations as the validate step measures them, how much of the adapter's effect survives, and whether merge,
unmerge and reload give the same logits. A recipe whose base loses an adapter's effect fails here."""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from quantgate import adapters, drift, modeling
from quantgate.backends import RecipeBase
from quantgate.formats import error_line
from quantgate.loading import load_saved
from quantgate.results import AdaptersChecked
from quantgate.settings import ValidateSettings


def check_adapters(checkpoint: str, recipe: RecipeBase, references: dict, base_stats: str, device: str | dict,
                   settings: ValidateSettings, compute_dtype: str = "auto", served: str | None = None) -> AdaptersChecked:
    """`references`: the reference step's measurements with each adapter; `base_stats`: the reference's own, without
    one; `served`: the dtype the checkpoint is served in (validate's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = torch.load(base_stats, weights_only=True)
    found = {}
    for name, reference in references.items():
        if why := reference.get("error"):
            found[name] = {"verdict": "not_run", "reasons": [], "notes": [f"not measured: the reference with it: {why}"]}
            continue
        try:
            found[name] = check_one(checkpoint, recipe, reference, base, tokenizer, device, settings, compute_dtype, served)
        except Exception as e:  # one adapter's error is recorded; the others are still measured
            found[name] = {"verdict": "error", "reasons": [error_line(e)], "notes": []}
    return ended(found)


def ended(found: dict) -> AdaptersChecked:
    """The step's end: failed where an adapter's verdict fails, error where one could not be measured."""
    said = lambda verdict: [f"{n}: {'; '.join(r['reasons'])}" for n, r in found.items() if r["verdict"] == verdict]  # noqa: E731
    failed, errors = said("fail"), said("error")
    warnings = [f"{n}: {reason}" for n, r in found.items() if r["verdict"] == "warn" for reason in r["reasons"]]
    warnings += [f"{n}: {note}" for n, r in found.items() for note in r["notes"]]
    status = "failed" if failed else "error" if errors else "ok"
    return AdaptersChecked(status=status, reason="; ".join(failed or errors) or None, warnings=warnings, adapters=found)


def check_one(checkpoint: str, recipe: RecipeBase, reference: dict, base: dict, tokenizer, device, settings,
              compute_dtype: str, served: str | None) -> dict:
    """One adapter on the recipe's base: its verdict, the reasons, notes and what was measured."""
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    try:
        adapted = adapters.attach(model, Path(reference["folder"]))
    except Exception as e:  # peft has no LoRA layer for this library's weights, or the load failed: not servable
        reason = f"peft could not load the adapter onto {recipe.name}'s checkpoint: {error_line(e)}"
        return {"verdict": "fail", "reasons": [reason], "notes": []}
    stats = torch.load(reference["path"], weights_only=True)
    with modeling.timed(f"adapter on {recipe.name}"):
        survival = adapters.Survival(adapted, base)
        measured = drift.compare(adapted, tokenizer, stats, settings, served, each=survival)
        measured["effect"] = {**survival.result(), "kl_mean_reference": reference["effect"]["kl_mean"]}
        with tempfile.TemporaryDirectory(prefix="adapter-") as scratch:
            measured["equivalence"] = adapters.equivalence(adapted, tokenizer, Path(scratch))
    result, reasons = drift.verdict(measured, recipe.thresholds)
    worst, said = adapters.effect_verdict(measured["effect"], measured.get("kl_mean"), recipe.thresholds)
    notes = adapters.equivalence_warnings(measured["equivalence"]) + (said if worst == "pass" else [])
    return {"verdict": max(result, worst, key=drift.SEVERITY.index), "reasons": reasons + ([] if worst == "pass" else said),
            "notes": notes, "compute_dtype": modeling.computed_dtype(model), **measured}
