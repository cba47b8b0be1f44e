"""Which quantized modules cause a recipe's drift, and which to keep in high precision for it to pass. Two
measurements against the cached reference (quantgate.drift): a local error per module from one pass (the quantized
module run on the reference module's own input, against its output) to rank them all, then whole-model KL with one
module at a time put back in the checkpoint's dtype, as a skip pattern would leave it, to confirm the top."""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from contextlib import contextmanager

import torch

from quantgate import drift, modeling

LAYER = re.compile(r"\.layers\.(\d+)\.")
log = logging.getLogger("quantgate.remedy")


def quantized_modules(reference: torch.nn.Module, quantized: torch.nn.Module) -> list[str]:
    """The reference's Linear layers that the library replaced or whose weight it quantized, in the model's order."""
    return [name for name, module in reference.named_modules()
            if type(module) is torch.nn.Linear and modeling.is_quantized(quantized.get_submodule(name))]


@torch.no_grad()
def local_errors(reference, quantized, stats: dict) -> dict[str, float]:
    """Per quantized module, ||q(x) - r(x)||² / ||r(x)||² summed over the prompts' tokens, x being the reference
    module's own input: the error each module makes by itself, none carried from the modules before it."""
    names = quantized_modules(reference, quantized)
    error, norm = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    dtype, device = quantized.dtype, modeling.model_device(reference)

    def beside(name: str, twin: torch.nn.Module):
        def hook(module, inputs, output):
            mine, theirs = twin(inputs[0].to(dtype)).float(), output.float()
            error[name] += float((mine - theirs).pow(2).sum())
            norm[name] += float(theirs.pow(2).sum())
        return hook

    handles = [reference.get_submodule(n).register_forward_hook(beside(n, quantized.get_submodule(n))) for n in names]
    try:
        for prompt in stats["prompts"]:
            reference(input_ids=prompt["ids"].to(device))
    finally:
        for handle in handles:
            handle.remove()
    # A module whose output goes non-finite ranks first: nothing after it can be measured.
    return {n: error[n] / norm[n] if norm[n] and math.isfinite(error[n]) else (math.inf if norm[n] else 0.0)
            for n in names}


@torch.no_grad()
def drift_of(model, stats: dict) -> dict:
    """Mean and p99 KL and top-1 agreement against the reference's cached top-k, as validate measures them."""
    device = modeling.model_device(model)
    per = [drift.compare_prompt(ref, model(input_ids=ref["ids"].to(device)).logits[0].float().cpu())
           for ref in stats["prompts"]]
    kl, top1 = torch.cat([p["kl"] for p in per]), torch.cat([p["top1"] for p in per])
    finite = lambda x: float(x) if torch.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
    return {"kl_mean": finite(kl.mean()), "kl_p99": finite(kl.quantile(0.99)), "top1_agreement": float(top1.mean())}


@contextmanager
def restored(quantized, reference, names: list[str]):
    """The quantized model with these modules put back from the reference in the checkpoint's dtype, then undone."""
    kept = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        holder = quantized.get_submodule(parent)
        kept[name] = getattr(holder, child)
        setattr(holder, child, copy.deepcopy(reference.get_submodule(name)).to(quantized.dtype))
    try:
        yield quantized
    finally:
        for name, module in kept.items():
            parent, _, child = name.rpartition(".")
            setattr(quantized.get_submodule(parent), child, module)


def bytes_added(quantized, name: str, dtype: str) -> int:
    """What keeping a module in the checkpoint's dtype costs over its quantized form."""
    module = quantized.get_submodule(name)
    plain = sum(p.numel() for p in module.parameters()) * getattr(torch, dtype).itemsize
    return plain - modeling.real_bytes(module, as_dtype=dtype)


def by_layer(errors: dict[str, float]) -> list[dict]:
    """Each decoder layer's share of the summed local error, largest first."""
    total = sum(errors.values()) or 1.0
    layers: dict[int, float] = {}
    for name, e in errors.items():
        if match := LAYER.search(name):
            layers[int(match.group(1))] = layers.get(int(match.group(1)), 0.0) + e
    return sorted(({"layer": k, "share": round(v / total, 4)} for k, v in layers.items()), key=lambda r: -r["share"])


def shown(kl: float | None) -> str:
    return "non-finite" if kl is None else f"{kl:.4f}"


def recovered(base: float | None, kept: float | None) -> float | None:
    """The KL a kept module recovers; None where either is non-finite (the KL it leaves ranks it then)."""
    return round(base - kept, 5) if base is not None and kept is not None else None


def attribute(reference, quantized, stats: dict, dtype: str, top: int = 8) -> dict:
    """All quantized modules ranked by local error; the top `top` confirmed by the KL recovered when each alone is
    kept in high precision, and what that costs in bytes at the checkpoint's `dtype`."""
    t0 = time.perf_counter()
    errors = local_errors(reference, quantized, stats)
    base = drift_of(quantized, stats)
    log.info("local errors of %d modules, and the recipe's mean KL %s, in %.0f s", len(errors), shown(base["kl_mean"]),
             time.perf_counter() - t0)
    total = sum(errors.values()) or 1.0
    rows = []
    for name in sorted(errors, key=errors.get, reverse=True)[:top]:
        with restored(quantized, reference, [name]):
            kl = drift_of(quantized, stats)["kl_mean"]
        log.info("%s kept: mean KL %s", name, shown(kl))
        known = math.isfinite(errors[name])
        rows.append({"module": name, "local_error": round(errors[name], 6) if known else None,
                     "share": round(errors[name] / total, 4) if known and math.isfinite(total) else None,
                     "kl_mean": kl, "kl_recovered": recovered(base["kl_mean"], kl),
                     "bytes_added": bytes_added(quantized, name, dtype)})
    return {"method": "local error on the reference's inputs, then whole-model KL with each module kept",
            "prompts": len(stats["prompts"]), "quantized_modules": len(errors), "drift": base, "modules": rows,
            "layers": by_layer(errors)[:top], "ranking": sorted(errors, key=errors.get, reverse=True),
            "seconds": round(time.perf_counter() - t0, 1)}


def passes(measured: dict, t) -> bool:
    """Whether drift measured by drift_of is a pass under thresholds `t`: within both its warn and fail limits (a
    recipe may set a fail limit tighter than the warn one)."""
    if measured["kl_mean"] is None or measured["kl_p99"] is None:  # non-finite
        return False
    return (measured["kl_mean"] <= min(t.kl_mean_warn, t.kl_mean_fail) and measured["kl_p99"] <= min(
        t.kl_p99_warn, t.kl_p99_fail) and measured["top1_agreement"] >= max(t.top1_warn, t.top1_fail))


def keep_order(attribution: dict) -> list[str]:
    """The modules to keep, in order: those whose KL was confirmed, by the KL left with each kept (least first, a
    non-finite one last), then the rest by local error."""
    left = lambda r: r["kl_mean"] if r["kl_mean"] is not None else math.inf  # noqa: E731
    confirmed = [r["module"] for r in sorted(attribution["modules"], key=left)]
    return confirmed + [n for n in attribution["ranking"] if n not in confirmed]


def trial(reference, quantized, stats: dict, names: list[str], cost: int, thresholds) -> dict:
    with restored(quantized, reference, names):
        measured = drift_of(quantized, stats)
    log.info("%d modules kept: mean KL %s, top-1 %.3f", len(names), shown(measured["kl_mean"]),
             measured["top1_agreement"])
    return {"kept": len(names), "bytes": cost, **measured,
            "verdict": "pass" if passes(measured, thresholds) else "not a pass"}


def search(reference, quantized, stats: dict, attribution: dict, thresholds, budget: int, dtype: str) -> dict:
    """Keep the first 1, 2, 4 ... modules of keep_order until the drift passes or the next step would pass `budget`
    bytes (at the checkpoint's `dtype`), then halve the gap to the fewest that pass. Every variant tried, with its
    bytes, KL, top-1 and verdict."""
    # Keeping every module is no quantization: the last one stays quantized.
    order, start = keep_order(attribution)[:-1], modeling.real_bytes(quantized, as_dtype=dtype)
    added = [bytes_added(quantized, n, dtype) for n in order]
    cost = lambda k: start + sum(added[:k])  # noqa: E731
    tried, failing, passing, k = [], 0, None, 1
    while k <= len(order) and cost(k) <= budget:
        tried.append(trial(reference, quantized, stats, order[:k], cost(k), thresholds))
        if tried[-1]["verdict"] == "pass":
            passing = k
            break
        failing, k = k, min(2 * k, len(order)) if k < len(order) else k + 1
    while passing is not None and passing - failing > 1:
        mid = (passing + failing) // 2
        tried.append(trial(reference, quantized, stats, order[:mid], cost(mid), thresholds))
        failing, passing = (failing, mid) if tried[-1]["verdict"] == "pass" else (mid, passing)
    return {"tried": tried, "budget": budget, "kept": order[:passing] if passing else None,
            "over_budget_at": None if passing or k > len(order) else k}
