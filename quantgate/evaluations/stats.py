"""Paired comparisons of a recipe's per-item scores with the reference's: the mean delta with a bootstrap
interval, McNemar's exact test on the items that flipped, the smallest drop the test could have seen (its power at
the n run), and the joint decision over a recipe's paired evaluations."""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def paired_bootstrap(reference: dict[str, float], recipe: dict[str, float], iters: int = 10000,
                     seed: int = 0) -> dict:
    """Accuracy delta (recipe - reference) over the same questions, with a 95% percentile interval.
    Significant only where McNemar's test on the flips agrees: with a handful of discordant answers all one
    way the percentile interval leaves out zero although so few flips are chance (p 0.125 for 4 of 4)."""
    import torch  # here, not at import: the history and the command line read records without it

    keys = sorted(reference.keys() & recipe.keys())
    ref = torch.tensor([reference[k] for k in keys])
    rec = torch.tensor([recipe[k] for k in keys])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(keys), (iters, len(keys)), generator=generator)
    deltas = (rec[idx] - ref[idx]).mean(1)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975])).tolist()
    agreement = flips(ref, rec)
    changed = agreement["flips"]["right_to_wrong"] + agreement["flips"]["wrong_to_right"]
    return {"delta_acc": float((rec - ref).mean()), "delta_ci95": [low, high], "paired_n": len(keys),
            "significant": not (low <= 0 <= high) and agreement["flips"]["mcnemar_p"] < 0.05,
            "mde": minimum_detectable_effect(len(keys), changed), "mde_power": POWER, **agreement}


def flips(ref: torch.Tensor, rec: torch.Tensor) -> dict:
    """Per-question agreement: answers that flipped each way, and McNemar's exact two-sided p-value (a
    binomial test on the flips), so a recipe right as often but on other questions shows."""
    lost, gained = int(((ref == 1) & (rec == 0)).sum()), int(((ref == 0) & (rec == 1)).sum())
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n if n else 1.0
    return {"flips": {"right_to_wrong": lost, "wrong_to_right": gained, "agreement": 1 - n / len(ref) if len(ref) else None,
                      "mcnemar_p": min(1.0, 2 * tail)}}


ALPHA, POWER = 0.05, 0.8
WEAK_MDE = 0.05  # a "no significant drop" that could miss a larger drop than this does not mean "no drop"


def minimum_detectable_effect(n: int, changed: int, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest accuracy drop a paired test at `alpha` (two-sided) finds with `power` over n items of which
    `changed` flipped either way: Connor's (1987) sample size for McNemar's test, solved for the drop. A drop of d
    needs at least d of the items to flip, so none flipping still bounds it. 1.0: not even a total drop."""
    if n == 0:
        return 1.0
    z_alpha, z_power, rate = NormalDist().inv_cdf(1 - alpha / 2), NormalDist().inv_cdf(power), changed / n

    def needed(d: float) -> float:  # items needed to find a drop of d; falls as d grows
        p = max(rate, d)
        return (z_alpha * math.sqrt(p) + z_power * math.sqrt(max(p - d * d, 0.0))) ** 2 / d ** 2

    low, high = 1e-6, 1.0
    if needed(high) > n:
        return 1.0
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if needed(mid) > n else (low, mid)
    return round(high, 4)


def joint(results: dict[str, dict], alpha: float = ALPHA) -> dict | None:
    """One accuracy decision over a recipe's paired evaluations, the family-wise false-positive rate held at
    `alpha`: Holm's step-down over their McNemar p-values; a drop is an evaluation it rejects whose flips went more
    right to wrong than wrong to right. None where fewer than one is paired."""
    tested = {name: r["flips"]["mcnemar_p"] for name, r in results.items() if isinstance(r, dict) and "flips" in r}
    if not tested:
        return None
    order, adjusted, running = sorted(tested, key=tested.get), {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * tested[name]))
        adjusted[name] = round(running, 6)
    drops = [n for n in order if adjusted[n] < alpha
             and results[n]["flips"]["right_to_wrong"] > results[n]["flips"]["wrong_to_right"]]
    return {"method": f"Holm's step-down over {len(order)} paired evaluations' McNemar p-values, family-wise error "
                      f"{alpha}", "adjusted_p": adjusted, "drops": drops,
            "decision": "significant drop in " + ", ".join(drops) if drops else "no significant drop"}
