"""Drift against the reference: the validation prompts, the reference's measurements on them (top-k log-probs,
sampled hidden states, its non-finite scan and greedy generations, cached by checkpoint hash, prompt set and
settings) and a model's per-token comparison with them (KL, top-1, top-5, hidden-state cosine)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch

from quantgate.files import cached_tensors, save_tensors
from quantgate.formats import error_line
from quantgate import modeling
from quantgate.nonfinite import (NonFiniteScan, explain_nonfinite, first_nonfinite_layer, nonfinite_reason,
                                 overflow_reason, serving_limit)
from quantgate import prompts as validation_prompts
from quantgate.runlog import SHOWN
from quantgate.settings import ValidateSettings
from quantgate.sharing import each_token, give_way
from quantgate.backends import ValidateThresholds

log = logging.getLogger("quantgate.validate")


def load_prompts(settings: ValidateSettings) -> list[dict]:
    return validation_prompts.read(settings.prompts)


def encode(tokenizer, prompt: dict) -> torch.Tensor:
    if prompt["chat"] and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt["text"]}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt["text"], return_tensors="pt")["input_ids"]


@torch.no_grad()
def forward_scanned(model, ids: torch.Tensor, limit: float | None = None) -> tuple[torch.Tensor, tuple, list[str], tuple | None]:
    """Logits, hidden states, the modules whose output went non-finite, and the first whose output passed `limit`."""
    with NonFiniteScan(model) as scan:
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states, scan.flagged(), scan.beyond(limit) if limit else None


def overflow_of(prompt: str, over: tuple | None, limit: float | None, served: str, model) -> dict | None:
    """The record's entry for an output past the served dtype's range, or None."""
    if over is None:
        return None
    return {"prompt": prompt, "module": over[0], "max_abs": over[1], "limit": limit, "dtype": served,
            "computed": modeling.computed_dtype(model)}


def sample_positions(length: int, count: int) -> torch.Tensor:
    return torch.linspace(0, length - 1, steps=min(count, length)).round().long().unique()


def reference_key(checkpoint_sha256: str, dtype: str, settings: ValidateSettings, served: str | None = None) -> str:
    prompts = hashlib.sha256(settings.prompts.read_bytes()).hexdigest()
    spec = json.dumps([checkpoint_sha256, dtype, prompts, settings.top_k, settings.hidden_positions,
                       settings.generate_prompts, settings.max_new_tokens] + ([served] if served else []))
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = encode(tokenizer, prompt).to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             stopping_criteria=each_token())
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def measure_reference(model, tokenizer, settings: ValidateSettings, served: str | None = None) -> dict:
    """What every recipe is compared with: per prompt the top-k log-probs, sampled hidden states; where the model
    goes non-finite, or past the range of the dtype it is served in."""
    device = next(model.parameters()).device
    prompts, per_prompt, nonfinite, overflow = load_prompts(settings), [], None, None
    limit = serving_limit(served, modeling.computed_dtype(model))
    for prompt in prompts:
        give_way()
        ids = encode(tokenizer, prompt).to(device)
        logits, hidden, flagged, over = forward_scanned(model, ids, limit)
        if flagged and nonfinite is None and (found := explain_nonfinite(model, ids)):
            nonfinite = {"prompt": prompt["id"], **found}
        overflow = overflow or overflow_of(prompt["id"], over, limit, served, model)
        logp = torch.log_softmax(logits, -1)
        top = logp.topk(settings.top_k, dim=-1)
        positions = sample_positions(ids.shape[1], settings.hidden_positions).to(device)
        per_prompt.append({"id": prompt["id"], "ids": ids.cpu(), "top_logp": top.values.cpu(),
                           "top_idx": top.indices.cpu(), "positions": positions.cpu(),
                           "hidden": torch.stack([h[0, positions.to(h.device)].float().cpu() for h in hidden])})
    return {"prompts": per_prompt, "nonfinite": nonfinite, "overflow": overflow,
            "generations": own_generations(model, tokenizer, settings)}


def chat_prompts(settings: ValidateSettings, count: int) -> list[dict]:
    """The first `count` chat prompts of the validation set: what both models generate from."""
    return [p for p in load_prompts(settings) if p["chat"]][:count]


def own_generations(model, tokenizer, settings: ValidateSettings) -> dict[str, str]:
    """The model's greedy generations from the first generate_prompts chat prompts, by prompt id: what compare sets
    beside the reference's, and needs nothing of the reference's to make."""
    chat = chat_prompts(settings, settings.generate_prompts)
    return dict(zip([p["id"] for p in chat], generate(model, tokenizer, chat, settings.max_new_tokens)))


def reference_stats(model, tokenizer, checkpoint_sha256: str, dtype: str, cache_dir: Path,
                    settings: ValidateSettings, served: str | None = None) -> dict:
    """The reference's measurements from the cache, or measured and cached; returns path and summary. `served`:
    the dtype the checkpoint is served in, whose range its activations are checked against."""
    path = Path(cache_dir) / "reference" / reference_key(checkpoint_sha256, dtype, settings, served) / "validate.pt"
    stats = cached_tensors(path) if path.is_file() else None
    cached = stats is not None
    if not cached:
        t0 = time.perf_counter()
        stats = measure_reference(model, tokenizer, settings, served)
        save_tensors(path, stats)
        log.info("reference measured on %d prompts in %.1f s", len(stats["prompts"]), time.perf_counter() - t0, extra=SHOWN)
    return {"path": str(path), "cached": cached, "nonfinite": stats["nonfinite"], "overflow": stats.get("overflow"),
            "first_nonfinite_module": (stats["nonfinite"] or {}).get("first_nonfinite_module")}


def compare_one(model, ref: dict, limit: float | None, served: str | None, found: dict):
    """One prompt's per-token comparison and per-layer cosine; the first non-finite module (explained) and the
    first output past the served dtype's range go into `found`."""
    ids = ref["ids"].to(next(model.parameters()).device)
    logits, hidden, flagged, over = forward_scanned(model, ids, limit)
    if flagged and found["nonfinite"] is None and (explained := explain_nonfinite(model, ids)):
        found.update(nonfinite={"prompt": ref["id"], **explained}, layer=first_nonfinite_layer(hidden))
    found["overflow"] = found["overflow"] or overflow_of(ref["id"], over, limit, served, model)
    # A model over several GPUs leaves each layer's hidden states on its own GPU.
    mine = torch.stack([h[0, ref["positions"].to(h.device)].float().cpu() for h in hidden])
    return logits.cpu(), torch.nn.functional.cosine_similarity(mine, ref["hidden"], dim=-1).mean(-1)


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, from full logits (or log-probabilities)."""
    logp, logq = torch.log_softmax(p_logits.float(), -1), torch.log_softmax(q_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)


def compare_prompt(ref: dict, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token KL(reference || quantized) from the reference's top-k plus a tail bucket, top-1
    agreement and top-5 overlap."""
    logq = torch.log_softmax(logits.float(), -1)
    ref_logp, ref_idx = ref["top_logp"], ref["top_idx"]
    p = ref_logp.exp()
    logq_top = logq.gather(-1, ref_idx)
    head = (p * (ref_logp - logq_top)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(1e-12)
    q_tail = (1 - logq_top.exp().sum(-1)).clamp_min(1e-12)
    kl = (head + p_tail * (p_tail.log() - q_tail.log())).clamp_min(0)
    top5_q = logq.topk(5, -1)
    # bf16 logits tie often: a reference token counts when the quantized model ranks it as high as
    # its own k-th token (ties included), not only when the same tie member was picked.
    overlap = (logq_top[:, :5] >= top5_q.values[:, 4:5]).float().mean(-1)
    top1 = logq_top[:, 0] >= top5_q.values[:, 0]
    return {"kl": kl, "top1": top1.float(), "top5": overlap}


@torch.no_grad()
def compare(model, tokenizer, stats: dict, settings: ValidateSettings, served: str | None = None, each=None,
            made_before: dict[str, str] | None = None) -> dict:
    """A model against the reference's measurements: per-token KL, top-1 and top-5, per-layer hidden-state
    cosine, where it goes non-finite or past the range of the dtype it is served in, and its generations (those in
    `made_before`, by own_generations, where it holds every prompt the reference generated from). `each`,
    if given, is called with each prompt's reference measurements, the model's logits and their comparison."""
    kls, top1, top5, cosines, found = [], [], [], [], {"nonfinite": None, "layer": None, "overflow": None}
    limit = serving_limit(served, modeling.computed_dtype(model))
    for ref in stats["prompts"]:
        give_way()
        logits, cosine = compare_one(model, ref, limit, served, found)
        per_token = compare_prompt(ref, logits)
        if each:
            each(ref, logits, per_token)
        kls.append(per_token["kl"])
        top1.append(per_token["top1"])
        top5.append(per_token["top5"])
        cosines.append(cosine)
    kl, cos = torch.cat(kls), torch.stack(cosines).nanmean(0)
    finite = lambda x: float(x) if torch.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
    drops = (cos[:-1] - cos[1:]).nan_to_num(nan=float("inf"))
    nonfinite = found["nonfinite"]
    metrics = {
        "first_nonfinite_module": (nonfinite or {}).get("first_nonfinite_module"), "nonfinite": nonfinite,
        "first_nonfinite_layer": found["layer"], "overflow": found["overflow"], "kl_mean": finite(kl.mean()),
        "kl_p99": finite(kl.quantile(0.99)), "top1_agreement": float(torch.cat(top1).mean()),
        "top5_overlap": float(torch.cat(top5).mean()), "tokens": int(kl.numel()), "prompts": len(stats["prompts"]),
        "hidden_cosine": [round(float(c), 5) if torch.isfinite(c) else None for c in cos],
        # hidden_states[i] is the output of decoder layer i-1: the layer that lost the most agreement.
        "max_divergence_layer": int(drops.argmax()) if len(drops) else None}
    prompts = {p["id"]: p for p in load_prompts(settings)}
    try:
        if made_before is not None:  # whether the generations made before stood in for making them here
            metrics["generated_before"] = set(stats["generations"]) <= set(made_before)
        if metrics.get("generated_before"):
            texts = [made_before[i] for i in stats["generations"]]
        else:
            texts = generate(model, tokenizer, [prompts[i] for i in stats["generations"]], settings.max_new_tokens)
        metrics["generations"] = [{"prompt": i, "reference": stats["generations"][i], "quantized": text}
                                  for i, text in zip(stats["generations"], texts)]
    except Exception as e:  # a CUDA device-side assert included: a failed recipe, not a crashed flow
        metrics["generation_error"] = error_line(e)
    return metrics


SEVERITY = ["pass", "warn", "fail"]


def verdict(metrics: dict, t: ValidateThresholds) -> tuple[str, list[str]]:
    """pass, warn or fail, with the reasons, from the measured metrics and the recipe's thresholds."""
    fails, warns = [], []
    if metrics.get("first_nonfinite_module"):
        fails.append(nonfinite_reason(metrics["nonfinite"]))
    if metrics.get("overflow"):
        fails.append(overflow_reason(metrics["overflow"]))
    if metrics.get("generation_error"):
        fails.append(f"generation raised {metrics['generation_error']}")
    for key, label, fail_at, warn_at, higher_is_worse in (
            ("kl_mean", "mean KL", t.kl_mean_fail, t.kl_mean_warn, True),
            ("kl_p99", "p99 KL", t.kl_p99_fail, t.kl_p99_warn, True),
            ("top1_agreement", "top-1 agreement", t.top1_fail, t.top1_warn, False)):
        value = metrics.get(key)
        if value is None:  # not measured, or not finite: the non-finite reason covers it
            continue
        worse = (lambda a, b: a > b) if higher_is_worse else (lambda a, b: a < b)
        sign = ">" if higher_is_worse else "<"
        if worse(value, fail_at):
            fails.append(f"{label} {value:.4g} {sign} {fail_at} (fail threshold)")
        elif worse(value, warn_at):
            warns.append(f"{label} {value:.4g} {sign} {warn_at} (warn threshold)")
    if fails:
        return "fail", fails + warns
    return ("warn", warns) if warns else ("pass", [])
