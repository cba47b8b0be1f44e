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


def check_adapters(checkpoint: str, recipe: RecipeBase, served: dict, base_stats: str, device: str | dict,
                   settings: ValidateSettings, compute_dtype: str = "auto", dtype: str | None = None) -> AdaptersChecked:
    """`served`: the reference step's measurements per adapter; `base_stats`: the reference's own, without one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    base = torch.load(base_stats, weights_only=True)
    found = {name: check_one(checkpoint, recipe, reference, base, tokenizer, device, settings, compute_dtype, dtype)
             for name, reference in served.items()}
    failed = [f"{name}: {'; '.join(r['reasons'])}" for name, r in found.items() if r["verdict"] == "fail"]
    warned = [f"{name}: {reason}" for name, r in found.items() if r["verdict"] == "warn" for reason in r["reasons"]]
    return AdaptersChecked(status="failed" if failed else "ok", reason="; ".join(failed) or None,
                           warnings=warned + [f"{name}: {w}" for name, r in found.items() for w in r["notes"]],
                           adapters=found)


def check_one(checkpoint: str, recipe: RecipeBase, reference: dict, base: dict, tokenizer, device, settings,
              compute_dtype: str, dtype: str | None) -> dict:
    """One adapter on the recipe's base: its verdict, the reasons and what was measured."""
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    try:
        adapted = adapters.attach(model, Path(reference["folder"]))
    except Exception as e:  # peft has no LoRA layer for this library's weights, or the load failed: not servable
        reason = f"peft could not load the adapter onto {recipe.name}'s checkpoint: {error_line(e)}"
        return {"verdict": "fail", "reasons": [reason], "notes": []}
    stats = torch.load(reference["path"], weights_only=True)
    with modeling.timed(f"adapter on {recipe.name}"):
        survival = adapters.Survival(adapted, base)
        measured = drift.compare(adapted, tokenizer, stats, settings, dtype, each=survival)
        measured["effect"] = {**survival.result(), "kl_mean_reference": reference["effect"]["kl_mean"]}
        with tempfile.TemporaryDirectory(prefix="adapter-") as scratch:
            measured["equivalence"] = adapters.equivalence(adapted, tokenizer, Path(scratch))
    result, reasons = drift.verdict(measured, recipe.thresholds)
    worst, lost = adapters.effect_verdict(measured["effect"], recipe.thresholds)
    result = max(result, worst, key=drift.SEVERITY.index)
    return {"verdict": result, "reasons": reasons + lost, "notes": adapters.equivalence_warnings(measured["equivalence"]),
            "compute_dtype": modeling.computed_dtype(model), **measured}
