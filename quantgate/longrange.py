"""Damage that short prompts miss. Drift by position: teacher-forced KL and top-1 against the reference along long
sequences (WikiText-2 articles, and the reference's own long greedy generations), in position buckets. Degeneration:
greedy generations of several hundred tokens, their repetition, distinct n-grams and per-token entropy beside the
reference's."""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from pathlib import Path

import torch

from quantgate import modeling
from quantgate.drift import chat_prompts, compare_prompt, encode
from quantgate.files import cached_tensors, save_tensors, sha256_file
from quantgate.paths import DATA_DIR
from quantgate.runlog import SHOWN
from quantgate.sharing import each_token, give_way

log = logging.getLogger("quantgate.validate")
EDGES = (0, 128, 512, 2048, 8192, 32768, 131072)
ARTICLE = re.compile(r"^ = [^=].* = $", re.M)  # a WikiText article's title line


def buckets(length: int) -> list[tuple[int, int]]:
    """Position buckets of a sequence of `length` tokens: 0-128, 128-512, 512-2k, 2k-8k ..., the last cut at length."""
    edges = [e for e in EDGES if e < length] + [length]
    return list(zip(edges[:-1], edges[1:]))


def sampled(length: int, per_bucket: int) -> torch.Tensor:
    """Up to `per_bucket` evenly spaced positions in each bucket: every bucket weighs alike, whatever its width."""
    picks = [torch.linspace(a, b - 1, steps=min(per_bucket, b - a)).round().long() for a, b in buckets(length)]
    return torch.cat(picks).unique()


def articles(count: int) -> list[str]:
    """`count` stretches of the WikiText-2 test split, each starting at an article's title, spread over the file."""
    text = (DATA_DIR / "wikitext2" / "test.txt").read_text()
    starts = [m.start() for m in ARTICLE.finditer(text)]
    return [text[starts[i * len(starts) // count]:] for i in range(count)]


def context_of(model, wanted: int) -> int:
    """The tokens a long sequence takes: `wanted`, at most the model's own context."""
    return min(wanted, model.config.get_text_config(decoder=True).max_position_embeddings)


@torch.no_grad()
def reference_sequences(model, tokenizer, settings) -> list[dict]:
    """The reference's top-k log-probs at sampled positions of each long sequence: the WikiText stretches, then each
    long greedy generation (its prompt and what it generated), with that generation's own figures."""
    device, tokens, found = modeling.model_device(model), context_of(model, settings.long_context), []
    for i, text in enumerate(articles(settings.long_sequences)):
        ids = tokenizer(text[:tokens * 40], return_tensors="pt").input_ids[:, :tokens]  # generous: cut, then tokenize
        found.append({"id": f"wikitext-{i + 1}", "ids": ids, **top_at(model, ids.to(device), settings)})
    for made in own_generations(model, tokenizer, settings):
        found.append({"id": f"generation-{made['prompt']}", "ids": made["ids"], "prompt_tokens": made["prompt_tokens"],
                      "degeneration": made["degeneration"], "text": made["text"],
                      **top_at(model, made["ids"].to(device), settings)})
    return found


def own_generations(model, tokenizer, settings) -> list[dict]:
    """The model's long greedy generations from the first long_generations chat prompts: each its prompt's id, its
    prompt and generated ids, text and degeneration figures. Nothing of the reference's is needed to make them."""
    device = modeling.model_device(model)
    prompts = chat_prompts(settings, settings.long_generations)
    ids = [encode(tokenizer, prompt).to(device) for prompt in prompts]
    made = generated(model, tokenizer, ids, settings.long_new_tokens, settings.long_generation_batch) if ids else []
    return [{"prompt": prompt["id"], "prompt_tokens": tokens.shape[1], **own}
            for prompt, tokens, own in zip(prompts, ids, made)]


def top_at(model, ids: torch.Tensor, settings) -> dict:
    give_way()
    positions = sampled(ids.shape[1], settings.bucket_positions)
    logits = model(input_ids=ids, logits_to_keep=positions.to(ids.device)).logits[0].float()
    top = torch.log_softmax(logits, -1).topk(settings.top_k, -1)
    return {"positions": positions, "top_logp": top.values.cpu(), "top_idx": top.indices.cpu()}


def generated(model, tokenizer, prompts: list[torch.Tensor], new_tokens: int, batch: int = 1) -> list[dict]:
    """Greedy generations of `new_tokens` (no early stop, so every model's is as long), each with its degeneration
    figures, `batch` prompts a decode step (steps.validate.long_generation_batch)."""
    return [made for i in range(0, len(prompts), batch)
            for made in generated_together(model, tokenizer, prompts[i:i + batch], new_tokens)]


@torch.no_grad()
def generated_together(model, tokenizer, prompts: list[torch.Tensor], new_tokens: int) -> list[dict]:
    """The prompts' generations in one batch, left-padded and the padding masked out."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width, device = max(p.shape[1] for p in prompts), prompts[0].device
    ids = torch.full((len(prompts), width), pad, dtype=prompts[0].dtype, device=device)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - prompt.shape[1]:], mask[i, width - prompt.shape[1]:] = prompt[0], 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=pad,
                         stopping_criteria=each_token())
    logp = torch.log_softmax(torch.stack(out.scores).float(), -1)  # [new tokens, prompts, vocab]
    made = []
    for i, prompt in enumerate(prompts):
        new = out.sequences[i, width:].cpu()
        entropy = float(-(logp[:, i].exp() * logp[:, i]).nan_to_num().sum(-1).mean())
        made.append({"ids": torch.cat([prompt[0].cpu(), new])[None],
                     "text": tokenizer.decode(new, skip_special_tokens=True),
                     "degeneration": {**degeneration(new.tolist()), "entropy": round(entropy, 4)}})
    return made


def degeneration(tokens: list[int]) -> dict:
    """Repetition: the share of 4-grams that repeat an earlier one; distinct-2: the share of bigrams that are unique."""
    grams = lambda n: [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]  # noqa: E731
    four, two = grams(4), grams(2)
    return {"tokens": len(tokens), "repetition": round(1 - len(set(four)) / len(four), 4) if four else 0.0,
            "distinct_2": round(len(set(two)) / len(two), 4) if two else 1.0}


def bucket_of(position: int) -> tuple[int, int]:
    """The standard bucket a position falls in, whatever the length of its sequence."""
    i = max(i for i, e in enumerate(EDGES) if e <= position)
    return EDGES[i], EDGES[i + 1] if i + 1 < len(EDGES) else position + 1


@torch.no_grad()
def compare(model, tokenizer, stats: list[dict], settings, made_before: list[dict] | None = None) -> dict:
    """A model against the reference's long sequences: KL and top-1 per position bucket, teacher-forced on the
    reference's tokens; and its own long greedy generations from the same prompts, beside the reference's (those in
    `made_before`, by own_generations, where they start from the reference's prompts and are as long)."""
    device, per = modeling.model_device(model), {}
    for ref in stats:
        give_way()
        logits = model(input_ids=ref["ids"].to(device), logits_to_keep=ref["positions"].to(device)).logits[0]
        measured = compare_prompt(ref, logits.float().cpu())
        for j, position in enumerate(ref["positions"].tolist()):
            kl, top1 = per.setdefault(bucket_of(position), ([], []))
            kl.append(float(measured["kl"][j]))
            top1.append(float(measured["top1"][j]))
    longest = max(s["ids"].shape[1] for s in stats)
    rows = [bucket_row(a, min(b, longest), kl, top1) for (a, b), (kl, top1) in sorted(per.items())]
    refs = [s for s in stats if "degeneration" in s]
    made = taken = made_from_reference_prompts(refs, made_before)
    if made is None:
        prompts = [ref["ids"][:, :ref["prompt_tokens"]].to(device) for ref in refs]
        new_tokens = {ref["ids"].shape[1] - ref["prompt_tokens"] for ref in refs}  # one length: none stops early
        made = generated(model, tokenizer, prompts, new_tokens.pop(), settings.long_generation_batch) if refs else []
    generations = [{"prompt": ref["id"].removeprefix("generation-"), "reference": ref["degeneration"],
                    "quantized": own["degeneration"], "reference_text": ref["text"], "quantized_text": own["text"]}
                   for ref, own in zip(refs, made)]
    return {"longest": longest, "sequences": len(stats), "buckets": rows, "generations": generations,
            **({"generated_before": taken is not None} if made_before is not None else {})}


def made_from_reference_prompts(refs: list[dict], made_before: list[dict] | None) -> list[dict] | None:
    """`made_before`'s generations in the order of the reference's, where each starts from the reference's prompt
    tokens and is as long as its generation; else None (a tokenizer or setting that differs: generated again)."""
    if made_before is None:
        return None
    own = {made["prompt"]: made for made in made_before}
    picked = [own.get(ref["id"].removeprefix("generation-")) for ref in refs]
    return picked if all(same_start(ref, made) for ref, made in zip(refs, picked)) else None


def same_start(ref: dict, made: dict | None) -> bool:
    n = ref["prompt_tokens"]
    return made is not None and made["ids"].shape == ref["ids"].shape and torch.equal(made["ids"][:, :n], ref["ids"][:, :n])


def bucket_row(start: int, end: int, kl: list[float], top1: list[float]) -> dict:
    mean = torch.tensor(kl).mean()
    return {"from": start, "to": end, "positions": len(kl), "kl_mean": round(float(mean), 6) if torch.isfinite(mean)
            else None, "top1_agreement": round(sum(top1) / len(top1), 4)}


def level(value: float, warn_at: float, fail_at: float, higher_is_worse: bool = True) -> tuple[str, float] | None:
    """fail or warn with the threshold crossed, or None: as validate judges the short prompts."""
    worse = (lambda a, b: a > b) if higher_is_worse else (lambda a, b: a < b)
    return ("fail", fail_at) if worse(value, fail_at) else ("warn", warn_at) if worse(value, warn_at) else None


def verdicts(long: dict, t) -> tuple[str, list[str]]:
    """Each bucket past the first judged by the recipe's mean-KL and top-1 thresholds, and the long generations' mean
    repetition against the reference's: the worst verdict, with its reasons naming the bucket."""
    found = []
    for row in long["buckets"][1:]:  # 0-128 is what the short prompts see already
        where = f"positions {row['from']:,}-{row['to']:,}"
        if row["kl_mean"] is None:
            found.append(("fail", f"{where}: non-finite KL"))
            continue
        if hit := level(row["kl_mean"], t.kl_mean_warn, t.kl_mean_fail):
            found.append((hit[0], f"{where}: mean KL {row['kl_mean']:.4g} > {hit[1]} ({hit[0]} threshold)"))
        if hit := level(row["top1_agreement"], t.top1_warn, t.top1_fail, higher_is_worse=False):
            found.append((hit[0], f"{where}: top-1 agreement {row['top1_agreement']:.3f} < {hit[1]} ({hit[0]} threshold)"))
    if gens := long["generations"]:  # judged on the mean over the prompts: one greedy loop is not a verdict alone
        mine, theirs = (sum(g[who]["repetition"] for g in gens) / len(gens) for who in ("quantized", "reference"))
        worst = max(gens, key=lambda g: g["quantized"]["repetition"] - g["reference"]["repetition"])
        if hit := level(mine - theirs, t.repetition_increase_warn, t.repetition_increase_fail):
            found.append((hit[0], f"long generations: 4-gram repetition {mine:.2f} against the reference's {theirs:.2f} "
                                  f"(+{mine - theirs:.2f} > {hit[1]}, {hit[0]} threshold; most on {worst['prompt']}: "
                                  f"{worst['quantized']['repetition']:.2f} against {worst['reference']['repetition']:.2f})"))
    fails, warns = [r for v, r in found if v == "fail"], [r for v, r in found if v == "warn"]
    return ("fail" if fails else "warn" if warns else "pass"), fails + warns


def cache_name(settings) -> str:
    """The cache file's name, keyed by the settings and the data it reads (the rest is the reference folder's key)."""
    spec = [settings.long_context, settings.long_sequences, settings.long_generations, settings.long_new_tokens,
            settings.bucket_positions, settings.top_k, sha256_file(DATA_DIR / "wikitext2" / "test.txt")]
    if settings.long_generation_batch > 1:  # batched, the generations are others (docs/validation.md)
        spec.append(f"generation batch {settings.long_generation_batch}")
    return f"long-{hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]}.pt"


def reference_long(model, tokenizer, cache: Path, settings) -> dict | None:
    """The reference's long sequences, measured once and cached at `cache` (plain tensors); None where not asked."""
    if not settings.long_context or not (settings.long_sequences or settings.long_generations):
        return None
    stats = cached_tensors(cache) if cache.is_file() else None
    if stats is None:
        t0 = time.perf_counter()
        stats = reference_sequences(model, tokenizer, settings)
        save_tensors(cache, stats)
        log.info("reference measured on %d long sequences in %.1f s", len(stats), time.perf_counter() - t0, extra=SHOWN)
    return {"path": str(cache), "sequences": len(stats), "longest": max(s["ids"].shape[1] for s in stats)}
