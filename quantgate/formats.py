"""How numbers from a run's record read in tables, reports and cards."""
from __future__ import annotations

import re


def gb(n, missing: str = "–") -> str:
    return f"{n / 1e9:.3f} GB" if isinstance(n, (int, float)) else missing


def num(value, fmt: str, missing: str = "–") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else missing


def peak_memory(bench: dict) -> int | None:
    """The figure a user compares: GPU peak while generating, or host private peak without a GPU."""
    memory = bench.get("memory", {})
    return memory.get("gpu_peak_infer") or memory.get("host_private_peak")


def tower_measures(t: dict, cosine: str = "embedding cosine") -> str:
    """One tower's validation figures, as the report and the card print them."""
    return (f"{cosine} mean {num(t['embedding_cosine_mean'], '.4f')}, min {num(t['embedding_cosine_min'], '.4f')}; "
            f"{t['kind']}-prompt KL mean {num(t['kl_mean'], '.4f')}, top-1 {num(t['top1_agreement'], '.3f')}; "
            f"first non-finite module {t['first_nonfinite_module'] or 'none'}"
            + (f"; input dependence {t['input_dependence']:.4g} (reference {t['reference_input_dependence']:.4g}); "
               f"answers as the reference's {t['answer_agreement']:.2f}, the best constant answer's "
               f"{t['constant_answer_agreement']:.2f}" if "input_dependence" in t else ""))


def error_line(e: BaseException) -> str:
    """An exception as one line for a record or a message: its type and the first line of what it says."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def context_line(kv: dict) -> str:
    """`Context that fits in 12 GiB: 9,400 tokens with the dynamic cache (decoding 12.10 ms/token there); ...`,
    from a benchmark's kv_cache."""
    if kv.get("status") != "ok":
        return f"KV-cache capacity: {kv.get('status', 'not_run')} ({kv.get('reason', 'no memory_budget set')})"
    fits, refused = [], []
    for kind, c in kv["caches"].items():
        if c["status"] != "ok":
            refused.append(kind)
            continue
        there = f" (decoding {c['decode_ms_per_token']:.2f} ms/token there)" if "decode_ms_per_token" in c else ""
        fits.append(f"{c['context_tokens']:,} tokens with the {kind} cache{there}")
    line = f"Context that fits in {kv['budget'] / 2**30:g} GiB: " + ("; ".join(fits) or "none measured")
    return line + (f"; not offered for this model: {', '.join(refused)}" if refused else "")


def kl_line(kv: dict) -> str | None:
    """The quantized caches' KL against the full-precision cache, by position bucket, or None where none was measured."""
    measured = {k: c for k, c in kv.get("kl", {}).items() if c["status"] == "ok"}
    if not measured:
        return None
    first = next(iter(measured.values()))
    parts = [f"{k} KL mean {c['kl_mean']:.4g}, top-1 {c['top1_agreement']:.3f}; by position "
             + ", ".join(f"{r['from']:,}-{r['to']:,}: {r['kl_mean']:.4g}" for r in c.get("buckets", []))
             + (f" (**{c['flagged']}**)" if c.get("flagged") else "") for k, c in measured.items()]
    return (f"Quantized caches against the full-precision cache ({kv['kl_prompt']}; every position, fed "
            f"{first.get('chunk', '–')} tokens at a time): " + "; ".join(parts))


MARKUP = str.maketrans({c: f"\\{c}" for c in "\\`*_{}[]<>#|!$~"})


def text(value) -> str:
    """A name, a description or a reason as plain text in Markdown a person reads (and a UI renders as HTML):
    markup, HTML tags and math delimiters escaped, lines joined."""
    return str(value).translate(MARKUP).replace("\n", " ⏎ ").replace("\r", " ")


def code(value) -> str:
    """A path or a name as a Markdown code span, shown as it is: fenced with more backticks than any run inside it."""
    value = str(value).replace("\n", " ")
    runs = [len(r) for r in re.findall(r"`+", value)]
    fence = "`" * (max(runs, default=0) + 1)
    return f"{fence} {value} {fence}" if runs else f"{fence}{value}{fence}"


ADAPTER_HEADER = ["adapter", "verdict", "KL vs reference + adapter", "top-1", "adapter's KL effect (here / reference)",
                  "its decided tokens kept", "reload", "merge / unmerge top-1", "reasons"]


def adapter_row(name: str, a: dict) -> list[str]:
    """One served adapter on one recipe, as the report and the card print it."""
    effect, same = a.get("effect", {}), a.get("equivalence", {})
    merge = same.get("merge", {})
    merged = (f"{num(merge.get('top1_agreement'), '.3f')} / {num(same.get('unmerge', {}).get('top1_agreement'), '.3f')}"
              if merge.get("supported") else "not supported" if merge else "–")
    kept = (f"{num(effect.get('kept'), '.1%')} of {effect['decided_tokens']}" if effect.get("decided_tokens")
            else "none decided" if effect else "–")
    reload = same.get("reload", {})
    return [name, a["verdict"], num(a.get("kl_mean"), ".4f"), num(a.get("top1_agreement"), ".3f"),
            f"{num(effect.get('kl_mean'), '.4f')} / {num(effect.get('kl_mean_reference'), '.4f')}", kept,
            ("identical" if reload.get("identical") else num(reload.get("max_abs_logit_diff"), ".3g")) if reload else "–",
            merged, "; ".join(a.get("reasons", []) + a.get("notes", [])) or "–"]


def scored(evaluate: dict, evaluation) -> str:
    """An evaluation's cell: `0.412 (-0.010 [-0.020, +0.000]; -12/+8)` where it is paired with the reference."""
    m = evaluate.get(evaluation.name, {})
    if evaluation.metric not in m:
        return "–"
    if "delta_acc" not in m:
        return format(m[evaluation.metric], evaluation.fmt)
    low, high = m["delta_ci95"]
    flipped = m.get("flips")  # answers lost and gained against the reference's
    return (f"{m[evaluation.metric]:{evaluation.fmt}} ({m['delta_acc']:+.3f} [{low:+.3f}, {high:+.3f}]"
            + (f"; -{flipped['right_to_wrong']}/+{flipped['wrong_to_right']}" if flipped else "") + ")")


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, every cell made safe for one (text)."""
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(text(c) for c in row) + " |" for row in rows]]


def adapter_evaluation_header() -> list[str]:
    from quantgate import evaluations

    return ["adapter", *[e.column() for e in evaluations.registered()], "joint decision"]


def adapter_evaluation_rows(entry: dict) -> list[list[str]]:
    """A recipe's evaluations with each served adapter, against the reference with the same adapter: per adapter,
    each registered evaluation's cell and the joint decision."""
    from quantgate import evaluations

    return [[name, *[scored(found, e) for e in evaluations.registered()], (found.get("joint") or {}).get("decision", "–")]
            for name, found in ((entry.get("evaluate") or {}).get("adapters") or {}).items()]


def adapter_benchmark_lines(entry: dict) -> list[str]:
    """A recipe's benchmark with each served adapter on top, against its own without it: one line per adapter."""
    lines = []
    for name, found in ((entry.get("benchmark") or {}).get("adapters") or {}).items():
        if found.get("status", "ok") != "ok":
            lines.append(f"{name}: not measured: {found.get('reason')}")
            continue
        latency = found["latency"]
        lines.append(f"{name}: decode {latency['decode_ms_per_token']:.2f} ms/token ({found['decode_ms_added']:+.2f} ms, "
                     f"{found['decode_ratio']:.2f}x without it; {latency['runs'][0].get('fallback_reason') or latency['path']}), "
                     f"weights {found['real_bytes_added'] / 1e6:+.1f} MB")
    return lines
