"""Validate step: where a model goes non-finite, how far its logits drift from the reference, and
whether it still generates. Gives each recipe a verdict: pass, warn or fail.

The reference is measured once (top-k log-probs, sampled hidden states, its own non-finite scan
and greedy generations), saved in the cache keyed by checkpoint hash, prompt set and settings,
and reused by every recipe and every later run, so it is never in memory beside a quantized model.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from pathlib import Path

import torch
from prefect import task

from quantgate import modeling
from quantgate.backends import parse_recipe
from quantgate.config import DATA_DIR, ValidateSettings, ValidateThresholds
from quantgate.files import cached_tensors, write_atomic
from quantgate.formats import error_line
from quantgate.processors import load_processor
from quantgate.runlog import SHOWN

log = logging.getLogger("quantgate.validate")
PROMPTS = DATA_DIR / "validate_prompts.jsonl"


def load_prompts(path: Path = PROMPTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def encode(tokenizer, prompt: dict) -> torch.Tensor:
    if prompt["chat"] and tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt["text"]}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return tokenizer(prompt["text"], return_tensors="pt")["input_ids"]


# ---------------------------------------------------------------- non-finite scan

def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class NonFiniteScan:
    """Forward hooks on every module. The cheap pass queues each floating output and reduces them in
    batches with one fused L2-norm kernel (a NaN or Inf makes the norm non-finite; one sync a
    forward). `detailed` checks every element and records each flagged module's input statistics;
    it also confirms the cheap pass, whose norm could overflow on huge but finite values."""

    BATCH = 64  # outputs held before a reduction: bounds the activations kept alive

    def __init__(self, model: torch.nn.Module, detailed: bool = False):
        self.model, self.detailed = model, detailed
        self.names: list[str] = []
        self.pending: list[torch.Tensor] = []
        self.maxima: list[torch.Tensor] = []
        self.details: dict[str, dict] = {}
        # detailed: each finished module's largest finite |output| and dtype, in order, and where each module
        # started in that list, so a module's input can be traced to the module that produced it.
        self.finished: list[tuple[str, float, str]] = []
        self.started: dict[str, int] = {}

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook(name or type(self.model).__name__))
                        for name, module in self.model.named_modules()]
        if self.detailed:
            self.handles += [module.register_forward_pre_hook(self._start(name or type(self.model).__name__))
                             for name, module in self.model.named_modules()]
            # Leaves only: a decoder layer's output holds the huge values its down_proj made, and names less.
            self.leaves = {name for name, module in self.model.named_modules() if not any(module.children())}
        return self

    def _start(self, name: str):
        def hook(module, inputs):
            self.started.setdefault(name, len(self.finished))
        return hook

    def producer(self, name: str) -> dict | None:
        """The module, finished before `name` began, whose output held the largest finite values: where huge
        values that overflow in `name` (or between modules) came from."""
        before = [f for f in self.finished[:self.started.get(name, 0)] if f[1] is not None]
        if not before:
            return None
        module, max_abs, dtype = max(reversed(before), key=lambda f: f[1])
        return {"module": module, "max_abs": max_abs, "dtype": dtype}

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                outs = [output] if output.is_floating_point() and output.numel() else []
            else:
                outs = [t for t in _tensors(output) if t.is_floating_point() and t.numel()]
            if self.detailed:
                if any(not torch.isfinite(t).all() for t in outs):
                    self.names.append(name)
                    self.details.setdefault(name, _statistics(module, inputs, outs))
                if name in self.leaves:
                    finite = [t[torch.isfinite(t)] for t in outs]
                    largest = max((float(t.abs().max()) for t in finite if t.numel()), default=None)
                    self.finished.append((name, largest, str(outs[0].dtype) if outs else None))
                return
            self.pending += outs
            self.names += [name] * len(outs)
            if len(self.pending) >= self.BATCH:
                self._reduce()
        return hook

    def _reduce(self) -> None:
        if not self.pending:
            return
        # One fused kernel per device: a model over several GPUs leaves its outputs on each.
        where: dict[torch.device, list[int]] = {}
        for i, t in enumerate(self.pending):
            where.setdefault(t.device, []).append(i)
        home = self.maxima[0].device if self.maxima else self.pending[0].device
        norms = torch.empty(len(self.pending), dtype=torch.float32, device=home)
        for device, index in where.items():
            found = torch.stack(torch._foreach_norm([self.pending[i] for i in index], 2, dtype=torch.float32))
            norms[torch.tensor(index, device=home)] = found.to(home)
        self.maxima.append(norms)
        self.pending = []

    def flagged(self) -> list[str]:
        """Modules whose output held NaN or Inf, in the order they finished (execution order)."""
        if self.detailed:
            return list(dict.fromkeys(self.names))
        self._reduce()
        if not self.maxima:
            return []
        bad = (~torch.isfinite(torch.cat(self.maxima))).cpu().tolist()
        return list(dict.fromkeys(name for name, b in zip(self.names, bad) if b))


def _statistics(module: torch.nn.Module, inputs, outs: list[torch.Tensor]) -> dict:
    ins = [t for t in _tensors(inputs) if t.is_floating_point()]
    finite_in = [t[torch.isfinite(t)] for t in ins]
    return {"input_dtype": str(ins[0].dtype) if ins else None,
            "input_max_abs": max((float(t.abs().max()) for t in finite_in if t.numel()), default=None),
            "input_finite": all(bool(torch.isfinite(t).all()) for t in ins),
            "output_nan": any(bool(torch.isnan(t).any()) for t in outs),
            "output_inf": any(bool(torch.isinf(t).any()) for t in outs),
            "weight_finite": _weight_finite(module)}


def _weight_finite(module: torch.nn.Module) -> bool | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    try:
        return bool(torch.isfinite(weight.float()).all())
    except (RuntimeError, TypeError, NotImplementedError):  # packed or subclass weights: not readable this way
        return None


@torch.no_grad()
def forward_scanned(model, ids: torch.Tensor) -> tuple[torch.Tensor, tuple, list[str]]:
    with NonFiniteScan(model) as scan:
        out = model(input_ids=ids, output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states, scan.flagged()


@torch.no_grad()
def explain_nonfinite(model, ids: torch.Tensor) -> dict | None:
    """Second pass on a prompt that went non-finite: the first module and its input statistics."""
    with NonFiniteScan(model, detailed=True) as scan:
        model(input_ids=ids)
    flagged = scan.flagged()
    if not flagged:
        return None  # the cheap pass's norm overflowed: every value is finite
    first = flagged[0]
    return {"first_nonfinite_module": first, **scan.details[first], "produced_by": scan.producer(first),
            "affected_after": flagged[1:], "affected_count": len(flagged) - 1}


def nonfinite_reason(nonfinite: dict) -> str:
    """Where the output went non-finite and, for an overflow, where the huge values came from."""
    text = f"non-finite output from {nonfinite['first_nonfinite_module']} on"
    if nonfinite.get("weight_finite") is False:
        return text + " (its weight holds NaN or Inf)"
    source = nonfinite.get("produced_by")
    if source and source["dtype"] and source["dtype"].startswith("torch.float"):
        limit = torch.finfo(getattr(torch, source["dtype"].removeprefix("torch."))).max
        if source["max_abs"] > limit / 1e3 or not nonfinite.get("input_finite", True):
            text += (f"; its input came from {source['module']}, whose output reached max |x| {source['max_abs']:.4g} "
                     f"in {source['dtype'].removeprefix('torch.')} (limit {limit:.4g}): an overflow")
    return text


def first_nonfinite_layer(hidden_states: tuple) -> int | None:
    """Index into hidden_states (0 = embeddings, i = output of decoder layer i-1)."""
    return next((i for i, h in enumerate(hidden_states) if not torch.isfinite(h).all()), None)


def sample_positions(length: int, count: int) -> torch.Tensor:
    return torch.linspace(0, length - 1, steps=min(count, length)).round().long().unique()


# ---------------------------------------------------------------- the reference, once

def reference_key(checkpoint_sha256: str, dtype: str, settings: ValidateSettings) -> str:
    prompts = hashlib.sha256(PROMPTS.read_bytes()).hexdigest()
    spec = json.dumps([checkpoint_sha256, dtype, prompts, settings.top_k, settings.hidden_positions,
                       settings.generate_prompts, settings.max_new_tokens])
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[dict], max_new_tokens: int) -> list[str]:
    device = next(model.parameters()).device
    texts = []
    for prompt in prompts:
        ids = encode(tokenizer, prompt).to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


def measure_reference(model, tokenizer, settings: ValidateSettings) -> dict:
    """What every recipe is compared with: per prompt the top-k log-probs, sampled hidden states."""
    device = next(model.parameters()).device
    prompts, per_prompt, nonfinite = load_prompts(), [], None
    for prompt in prompts:
        ids = encode(tokenizer, prompt).to(device)
        logits, hidden, flagged = forward_scanned(model, ids)
        if flagged and nonfinite is None and (found := explain_nonfinite(model, ids)):
            nonfinite = {"prompt": prompt["id"], **found}
        logp = torch.log_softmax(logits, -1)
        top = logp.topk(settings.top_k, dim=-1)
        positions = sample_positions(ids.shape[1], settings.hidden_positions).to(device)
        per_prompt.append({"id": prompt["id"], "ids": ids.cpu(), "top_logp": top.values.cpu(),
                           "top_idx": top.indices.cpu(), "positions": positions.cpu(),
                           "hidden": torch.stack([h[0, positions.to(h.device)].float().cpu() for h in hidden])})
    chat = [p for p in prompts if p["chat"]][:settings.generate_prompts]
    return {"prompts": per_prompt, "nonfinite": nonfinite,
            "generations": dict(zip([p["id"] for p in chat], generate(model, tokenizer, chat, settings.max_new_tokens)))}


def reference_stats(model, tokenizer, checkpoint_sha256: str, dtype: str, cache_dir: Path,
                    settings: ValidateSettings) -> dict:
    """The reference's measurements from the cache, or measured and cached; returns path and summary."""
    path = Path(cache_dir) / "reference" / reference_key(checkpoint_sha256, dtype, settings) / "validate.pt"
    stats = cached_tensors(path) if path.is_file() else None
    cached = stats is not None
    if not cached:
        t0 = time.perf_counter()
        stats = measure_reference(model, tokenizer, settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(stats, buffer)
        write_atomic(path, buffer.getvalue())
        log.info("reference measured on %d prompts in %.1f s", len(stats["prompts"]), time.perf_counter() - t0, extra=SHOWN)
    return {"path": str(path), "cached": cached, "nonfinite": stats["nonfinite"],
            "first_nonfinite_module": (stats["nonfinite"] or {}).get("first_nonfinite_module")}


# ---------------------------------------------------------------- comparing a recipe

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


def verdict(metrics: dict, t: ValidateThresholds) -> tuple[str, list[str]]:
    """pass, warn or fail, with the reasons, from the measured metrics and the recipe's thresholds."""
    fails, warns = [], []
    if metrics.get("first_nonfinite_module"):
        fails.append(nonfinite_reason(metrics["nonfinite"]))
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


@torch.no_grad()
def compare(model, tokenizer, stats: dict, settings: ValidateSettings) -> dict:
    device = next(model.parameters()).device
    kls, top1, top5, cosines, nonfinite, layer = [], [], [], [], None, None
    for ref in stats["prompts"]:
        ids = ref["ids"].to(device)
        logits, hidden, flagged = forward_scanned(model, ids)
        if flagged and nonfinite is None and (found := explain_nonfinite(model, ids)):
            nonfinite = {"prompt": ref["id"], **found}
            layer = first_nonfinite_layer(hidden)
        per_token = compare_prompt(ref, logits.cpu())
        kls.append(per_token["kl"])
        top1.append(per_token["top1"])
        top5.append(per_token["top5"])
        # A model over several GPUs leaves each layer's hidden states on its own GPU.
        mine = torch.stack([h[0, ref["positions"].to(h.device)].float().cpu() for h in hidden])
        cosines.append(torch.nn.functional.cosine_similarity(mine, ref["hidden"], dim=-1).mean(-1))
    kl, cos = torch.cat(kls), torch.stack(cosines).nanmean(0)
    finite = lambda x: float(x) if torch.isfinite(x) else None  # noqa: E731 (JSON has no NaN)
    drops = (cos[:-1] - cos[1:]).nan_to_num(nan=float("inf"))
    metrics = {
        "first_nonfinite_module": (nonfinite or {}).get("first_nonfinite_module"), "nonfinite": nonfinite,
        "first_nonfinite_layer": layer, "kl_mean": finite(kl.mean()), "kl_p99": finite(kl.quantile(0.99)),
        "top1_agreement": float(torch.cat(top1).mean()), "top5_overlap": float(torch.cat(top5).mean()),
        "tokens": int(kl.numel()), "prompts": len(stats["prompts"]),
        "hidden_cosine": [round(float(c), 5) if torch.isfinite(c) else None for c in cos],
        # hidden_states[i] is the output of decoder layer i-1: the layer that lost the most agreement.
        "max_divergence_layer": int(drops.argmax()) if len(drops) else None}
    prompts = {p["id"]: p for p in load_prompts()}
    try:
        texts = generate(model, tokenizer, [prompts[i] for i in stats["generations"]], settings.max_new_tokens)
        metrics["generations"] = [{"prompt": i, "reference": stats["generations"][i], "quantized": text}
                                  for i, text in zip(stats["generations"], texts)]
    except Exception as e:  # a CUDA device-side assert included: a failed recipe, not a crashed flow
        metrics["generation_error"] = error_line(e)
    return metrics


def validate(checkpoint: str, recipe: dict, reference: dict, device: str, settings: dict,
             compute_dtype: str = "auto") -> dict:
    """Compare a recipe's saved checkpoint with the reference; the step's record with its verdict."""
    from tasks import towers
    from tasks.quantize import kernel_of, load_saved
    from transformers import AutoTokenizer

    recipe = parse_recipe(recipe)
    settings = ValidateSettings.model_validate(settings)
    stats = torch.load(reference["path"], weights_only=True)  # the reference step wrote it this run, or checked it
    t0 = time.perf_counter()
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    load_s = round(time.perf_counter() - t0, 2)
    with modeling.timed(f"validate {recipe.name}"):
        metrics = compare(model, AutoTokenizer.from_pretrained(checkpoint), stats, settings)
    metrics.update(compute_dtype=modeling.computed_dtype(model), load_s=load_s, **kernel_of(recipe))
    result, reasons = verdict(metrics, recipe.thresholds)
    if reference.get("towers"):  # a multimodal model: its vision and audio towers, on their own prompts
        metrics["towers"] = towers.compare(model, load_processor(checkpoint), reference["towers"],
                                           settings.max_new_tokens)
        worst, tower_reasons = towers.verdicts(metrics["towers"], recipe.thresholds)
        result = max(result, worst, key=["pass", "warn", "fail"].index)
        reasons += tower_reasons
    if result == "fail" and reference.get("first_nonfinite_module"):
        reasons.insert(0, f"the reference itself goes non-finite from {reference['first_nonfinite_module']} on: "
                          "a broken base model, not a broken quantization")
    status = {"pass": "ok", "warn": "ok", "fail": "failed"}[result]
    return {"status": status, "reason": "; ".join(reasons) if status == "failed" else None,
            "warnings": reasons if result == "warn" else [], "verdict": result, "reasons": reasons, **metrics}


validate_task = task(validate, name="validate", task_run_name="validate-{recipe[name]}")
