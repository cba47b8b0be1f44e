"""Paired comparisons of a recipe's per-item scores with the reference's: the mean delta with a bootstrap
interval, and McNemar's exact test on the items that flipped."""
from __future__ import annotations

import math

import torch


def paired_bootstrap(reference: dict[str, float], recipe: dict[str, float], iters: int = 10000,
                     seed: int = 0) -> dict:
    """Accuracy delta (recipe - reference) over the same questions, with a 95% percentile interval.
    Significant only where McNemar's test on the flips agrees: with a handful of discordant answers all one
    way the percentile interval leaves out zero although so few flips are chance (p 0.125 for 4 of 4)."""
    keys = sorted(reference.keys() & recipe.keys())
    ref = torch.tensor([reference[k] for k in keys])
    rec = torch.tensor([recipe[k] for k in keys])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(keys), (iters, len(keys)), generator=generator)
    deltas = (rec[idx] - ref[idx]).mean(1)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975])).tolist()
    agreement = flips(ref, rec)
    return {"delta_acc": float((rec - ref).mean()), "delta_ci95": [low, high], "paired_n": len(keys),
            "significant": not (low <= 0 <= high) and agreement["flips"]["mcnemar_p"] < 0.05, **agreement}


def flips(ref: torch.Tensor, rec: torch.Tensor) -> dict:
    """Per-question agreement: answers that flipped each way, and McNemar's exact two-sided p-value (a
    binomial test on the flips), so a recipe right as often but on other questions shows."""
    lost, gained = int(((ref == 1) & (rec == 0)).sum()), int(((ref == 0) & (rec == 1)).sum())
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n if n else 1.0
    return {"flips": {"right_to_wrong": lost, "wrong_to_right": gained, "agreement": 1 - n / len(ref) if len(ref) else None,
                      "mcnemar_p": min(1.0, 2 * tail)}}
