"""The run's report (report.md) and its summary table, made from the record alone (metrics.json): a number that
is not in the record is not in the report. The evaluations' columns come from their registry."""
from __future__ import annotations

from pathlib import Path

from quantgate import evaluations
from quantgate.evaluations import power_line
from quantgate.files import write_atomic
from quantgate.formats import (ADAPTER_HEADER, adapter_benchmark_lines, adapter_evaluation_header, adapter_evaluation_rows,
                               adapter_row, code, context_line, gb, kl_line, num, peak_memory, scored, text,
                               tower_measures)
from quantgate.plan import tower_lines
from quantgate.timeline import time_to_verdict

STEPS = ("quantize", "validate", "evaluate", "benchmark", "publish")
KV_CACHE_HEADER = ["model", "budget", "cache", "context tokens", "decode ms/token there", "stopped by"]
BENCHMARK_HEADER = ["model", "load s", "host private peak", "host file-backed peak", "GPU peak load", "GPU peak infer",
                    "prefill ms", "decode ms/token", "tokens/s", "x bandwidth floor", "decode path"]
ATTRIBUTION_HEADER = ["module", "local error", "share", "KL with it kept", "KL recovered", "bytes added"]
SEARCH_HEADER = ["modules kept (in memory)", "bytes", "KL mean", "KL p99", "top-1", "verdict"]
VARIANT_HEADER = ["variant", "change", "bytes", "KL mean", "KL p99", "top-1", "verdict"]


def _peak(bench: dict) -> str:
    peak = peak_memory(bench)
    if peak is None:
        return "–"
    reduction = bench["memory"].get("peak_reduction_vs_reference")
    return gb(peak) + (f" ({reduction:+.0%})" if reduction is not None else "")


def _decode(bench: dict) -> str:
    latency = bench.get("latency", {})
    if "decode_ms_per_token" not in latency:
        return "–"
    speedup = latency.get("speedup_vs_reference")
    return f"{latency['decode_ms_per_token']:.2f}" + (f" ({speedup:.2f}x)" if speedup is not None else "")


def summary_header() -> list[str]:
    return ["recipe", "status", "real bytes", "of reference", "quantized/skipped/fallback", "verdict", "KL mean",
            "top-1 vs ref", *[e.column() for e in evaluations.registered()], "peak memory (vs ref)",
            "decode ms/token (speedup)", "reason or warnings"]


def summary_rows(metrics: dict) -> list[list[str]]:
    ref = metrics["reference"]
    ref_bytes, ref_eval = ref.get("real_bytes"), ref.get("evaluate", {})
    rows = [["reference", ref.get("status", "–"), gb(ref_bytes), "100%", "", "", "", "",
             *[scored(ref_eval, e) for e in evaluations.registered()], _peak(ref.get("benchmark", {})),
             _decode(ref.get("benchmark", {})), ""]]
    for name, entry in metrics["recipes"].items():
        q, v, e, b = (entry.get(step, {}) for step in ("quantize", "validate", "evaluate", "benchmark"))
        ratio = f"{q['real_bytes'] / ref_bytes:.1%}" if q.get("real_bytes") and ref_bytes else "–"
        counts = f"{q['quantized_modules']}/{q['skipped_modules']}/{q['fallback_modules']}" if "quantized_modules" in q else "–"
        rows.append([name, entry["status"], gb(q.get("real_bytes")), ratio, counts, v.get("verdict", "–"),
                     num(v.get("kl_mean"), ".4f"), num(v.get("top1_agreement"), ".3f"),
                     *[scored(e, ev) for ev in evaluations.registered()], _peak(b), _decode(b), note(metrics, entry)])
    return rows


NOT_GATED = "not gated: "  # a recipe's reason where the model's own fault stopped it (RunRecord.set_base_broken)


def note(metrics: dict, entry: dict) -> str:
    """The row's reason, or its first warning and how many more."""
    if metrics.get("base_broken") and entry.get("reason", "").startswith(NOT_GATED):  # said under the table
        return f"{NOT_GATED}the base model is broken"
    warnings = entry.get("warnings", [])
    more = f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else ""
    return entry.get("reason") or (f"{warnings[0]}{more}" if warnings else "")


def benches_of(metrics: dict) -> list[tuple[str, dict]]:
    return [("reference", metrics["reference"].get("benchmark", {}))] + \
        [(name, entry.get("benchmark", {})) for name, entry in metrics["recipes"].items()]


def kv_cache_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for name, b in benches_of(metrics):
        kv = b.get("kv_cache")
        if not kv:
            continue
        if kv["status"] != "ok":
            rows.append([name, "–", "–", "–", "–", text(context_line(kv))])
            continue
        for kind, c in kv["caches"].items():
            stopped = c.get("stopped_by") or c.get("reason", "")
            rows.append([name, f"{kv['budget'] / 2**30:g} GiB", kind, num(c.get("context_tokens"), ","),
                         num(c.get("decode_ms_per_token"), ".2f", c.get("decode_error", "–")), text(stopped)])
    return rows


def benchmark_rows(metrics: dict) -> list[list[str]]:
    rows = []
    for name, b in benches_of(metrics):
        if "memory" not in b:
            continue
        m, lat = b["memory"], b["latency"]
        rows.append([name, num(b.get("load_s"), ".1f"), gb(m["host_private_peak"]), gb(m["host_file_peak"]),
                     gb(m["gpu_peak_load"]), gb(m["gpu_peak_infer"]), num(lat["prefill_ms"], ".1f"),
                     num(lat["decode_ms_per_token"], ".2f"), num(lat["tokens_per_s"], ".1f"),
                     num(lat.get("of_bandwidth_floor"), ".2f"), lat["path"]])
    return rows


def attribution_rows(found: dict) -> list[list[str]]:
    return [[code(r["module"]), num(r["local_error"], ".4g"), num(r["share"], ".3f"), num(r["kl_mean"], ".4f"),
             num(r["kl_recovered"], "+.4f"), f"{r['bytes_added']:,}"] for r in (found or {}).get("modules", [])]


def search_rows(search: dict | None) -> list[list[str]]:
    return [[str(t["kept"]), f"{t['bytes']:,}", num(t["kl_mean"], ".4f"), num(t["kl_p99"], ".3f"),
             num(t["top1_agreement"], ".3f"), t["verdict"]] for t in (search or {}).get("tried", [])]


def variant_rows(gated: dict | None) -> list[list[str]]:
    return [[str(t["variant"]), t["change"], num(t["bytes"], ",d"), num(t.get("kl_mean"), ".4f"),
             num(t.get("kl_p99"), ".3f"), num(t.get("top1_agreement"), ".3f"), t["verdict"]]
            for t in (gated or {}).get("tried", [])]


def remedy_lines(name: str, remedy: dict, found: dict | None) -> list[str]:
    """What causes a recipe's drift (its attribution), the variants gated and the recipe that passes (`steps.remedy`)."""
    lines = ["", f"## {name}: remedy", ""]
    if found:
        lines += [f"Modules ranked by their error on the reference's own inputs ({found['quantized_modules']} quantized "
                  f"modules); the top {len(found['modules'])} confirmed by the mean KL left with each kept in high "
                  f"precision (recipe's own: {num(found['drift']['kl_mean'], '.4f', 'non-finite')}).", "",
                  *table(ATTRIBUTION_HEADER, attribution_rows(found)), "", *table(SEARCH_HEADER, search_rows(remedy["search"]))]
    else:
        lines.append("The text prompts' drift passes: no module attribution.")
    lines += ["", f"Variants quantized and validated for real, in order, within {num(remedy.get('budget'), ',d')} bytes:",
              "", *table(VARIANT_HEADER, variant_rows(remedy.get("gated")))]
    return lines + ["", f"Recipe that passes: `{remedy['file']}`." if remedy.get("file") else f"{text(remedy.get('reason'))}."]


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *["| " + " | ".join(text(c) if i == len(row) - 1 else c for i, c in enumerate(row)) + " |" for row in rows]]


def write_report(run_dir: Path, metrics: dict) -> None:
    """report.md, summary.png and timeline.png from the run's record (also `quantgate report RUN_DIR`)."""
    from quantgate.figure import plot_run
    from quantgate.timeline import plot_timeline

    figure, timeline = plot_run(metrics, run_dir / "summary.png"), plot_timeline(metrics, run_dir / "timeline.png")
    write_atomic(run_dir / "report.md", render_report(metrics, figure.name if figure else None,
                                                      timeline.name if timeline else None))


def render_report(metrics: dict, figure: str | None = None, timeline: str | None = None) -> str:
    model = metrics["model"]
    lines = [f"# quantgate run {metrics['run_id']}", "",
             f"- model: {code(model['source'])} (revision {code(model.get('revision'))}, checkpoint sha256 "
             f"`{str(model.get('checkpoint_sha256'))[:16]}…`)",
             f"- status: **{metrics['status']}**, {metrics['started_at']} → {metrics['finished_at']}",
             f"- computed in {metrics['reference'].get('compute_dtype', '–')} (checkpoint "
             f"{metrics['reference'].get('dtype', '–')}); everything the libraries printed: [run.log](run.log)", "",
             *table(summary_header(), summary_rows(metrics))]
    if metrics.get("base_broken"):
        lines += ["", f"**{text(metrics['base_broken'])}.** No recipe was gated: none of their verdicts could mean "
                      "anything."]
    if figure:
        lines += ["", f"![MMLU delta against memory and speed]({figure})"]
    lines += accuracy_lines(metrics) + step_lines(metrics, timeline) + benchmark_lines(metrics) + kv_cache_lines(metrics)
    tower_rows = [(name, line) for name, entry in metrics["recipes"].items()
                  for line in tower_lines(entry.get("quantize", {}).get("towers", {}))]
    if tower_rows:
        lines += ["", "## Towers", ""] + [f"- {name}: {line}" for name, line in tower_rows]
    lines += adapter_lines(metrics)
    for name, entry in metrics["recipes"].items():
        lines += validation_lines(name, entry.get("validate", {}))
        if entry.get("remedy"):
            lines += remedy_lines(name, entry["remedy"], entry.get("validate", {}).get("attribution"))
    published = [(n, e["publish"]) for n, e in metrics["recipes"].items() if e.get("publish", {}).get("location")]
    if published:
        lines += ["", "## Published", ""] + [f"- {n}: {text(p['location'])}" for n, p in published]
    lines += ["", "Steps marked not_run did not run; they carry no numbers.",
              "Each recipe's plan (which Linear layers were quantized, skipped or left in high precision) "
              "is in `<recipe>/plan.json`.", ""]
    return "\n".join(lines)


def accuracy_lines(metrics: dict) -> list[str]:
    """Each recipe's joint accuracy decision and what its paired evaluations could have seen (their power)."""
    rows = []
    for name, entry in metrics["recipes"].items():
        found = entry.get("evaluate", {})
        powers = [f"{e.label} {power_line(found[e.name])}" for e in evaluations.registered()
                  if e.paired and "mde" in found.get(e.name, {})]
        if found.get("joint") or powers:
            rows.append(f"- {name}: {(found.get('joint') or {}).get('decision', 'no joint decision')}"
                        + (f"; {'; '.join(powers)}" if powers else ""))
    joints = [e["evaluate"]["joint"] for e in metrics["recipes"].values() if e.get("evaluate", {}).get("joint")]
    said = f"Decided jointly over the paired evaluations: {joints[0]['method']}." if joints else "No joint decision."
    return ["", "## Accuracy", "", said, "", *rows] if rows else []


def step_lines(metrics: dict, timeline: str | None = None) -> list[str]:
    model, ref = metrics["model"], metrics["reference"]
    seconds = [("download", model.get("download", {}).get("seconds")), ("reference load", ref.get("load_s")),
               ("reference validate", ref.get("validate_s")), ("reference evaluate", ref.get("evaluate_s")),
               ("reference benchmark", ref.get("benchmark", {}).get("seconds"))]
    lines = ["", "## Steps", "", "Seconds of the model's steps: "
             + ", ".join(f"{what} {num(s, '.1f')}" for what, s in seconds) + ".",
             "", "| recipe | " + " | ".join(STEPS) + " |", "| --- |" + " --- |" * len(STEPS)]
    for name, entry in metrics["recipes"].items():
        cells = [s["status"] + (f" ({s['seconds']:.1f} s)" if s.get("seconds") is not None else "")
                 for s in (entry["steps"][step] for step in STEPS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if (finish := time_to_verdict(metrics)) is not None:
        lines += ["", f"The verdict came {finish:.0f} s after the run's start."]
    if timeline:
        lines += ["", f"![Each step's span from the run's start]({timeline})"]
    return lines


def benchmark_lines(metrics: dict) -> list[str]:
    rows = benchmark_rows(metrics)
    if not rows:
        return []
    floor = next((b for b in [metrics["reference"].get("benchmark", {})] if "copy_bandwidth" in b), {})
    lines = ["", "## Memory and latency", "",
             "Each model in a process of its own (forked or fresh: docs/benchmark.md), loaded (and quantized) as a user "
             "loads it; batch "
             f"{floor.get('latency', {}).get('runs', [{}])[0].get('batch_size', '–')}, medians of the repeats. "
             "Host private is RssAnon; file-backed is the memory-mapped checkpoint. The bandwidth floor is "
             "the weight bytes read per token over the measured copy bandwidth"
             + (f" ({floor['copy_bandwidth'] / 1e9:.0f} GB/s)." if floor else "."), "", *table(BENCHMARK_HEADER, rows)]
    return lines + [f"- {name}: {text(d)}" for name, b in benches_of(metrics) for d in b.get("diagnostics", [])]


def kv_cache_lines(metrics: dict) -> list[str]:
    rows = kv_cache_rows(metrics)
    if not rows:
        return []
    return ["", "## KV cache", "",
            "The longest context (prompt and generated tokens) whose chunked prefill and decoding fit the memory "
            "budget with the model loaded, per cache, found by prefilling until a chunk did not fit; decoding "
            "one token at a time at that context.", "", *table(KV_CACHE_HEADER, rows),
            *[f"- {name}: {line}" for name, b in benches_of(metrics) if (line := kl_line(b.get("kv_cache", {})))]]


def adapter_lines(metrics: dict) -> list[str]:
    """Each served adapter on each recipe's base against the reference with it (quantgate/adapters.py)."""
    served = metrics["reference"].get("adapters") or {}
    rows = [[recipe, *adapter_row(name, a)] for recipe, entry in metrics["recipes"].items()
            for name, a in (entry.get("adapters") or {}).items()]
    if not served:
        return []
    effects = "; ".join(f"{code(name)} ({code(a['source'])}) not measured: {text(a['error'])}" if a.get("error") else
                        f"{code(name)} ({code(a['source'])}, r {a['r']}, {a['adapted_modules']} modules) changes the "
                        f"reference's top-1 on {a['effect']['changed_tokens']} of {a['effect']['tokens']} tokens, KL "
                        f"{a['effect']['kl_mean']:.4f}" for name, a in served.items())
    evaluated = [[recipe, *row] for recipe, entry in metrics["recipes"].items() for row in adapter_evaluation_rows(entry)]
    return ["", "## Adapters", "", f"Served on every recipe, loaded by peft on its saved checkpoint: {effects}. A "
            "recipe keeps an adapter's decided tokens where its base with the adapter still picks the reference-with-"
            "adapter's top-1 there.", "", *table(["recipe", *ADAPTER_HEADER], rows),
            *(["", "Evaluated with each adapter, against the reference with the same adapter:", "",
               *table(["recipe", *adapter_evaluation_header()], evaluated)]
              if evaluated else []),
            *(["", "Benchmarked with each adapter on top, against the same checkpoint without it:", "", *benched]
              if (benched := [f"- {recipe}, {line}" for recipe, entry in metrics["recipes"].items()
                              for line in adapter_benchmark_lines(entry)]) else [])] if rows else \
        ["", "## Adapters", "", f"Served: {effects}. No recipe reached them (see each recipe's status)."]


def validation_lines(name: str, v: dict) -> list[str]:
    """A recipe's non-finite finding, greedy generations and towers' answers beside the reference's."""
    lines = []
    if nf := v.get("nonfinite"):
        lines += ["", f"## {name}: non-finite", "",
                  f"First non-finite module: `{nf['first_nonfinite_module']}` (prompt `{nf['prompt']}`; input "
                  f"{nf.get('input_dtype')}, max |x| {nf.get('input_max_abs')}, input finite: {nf.get('input_finite')}, "
                  f"weight finite: {nf.get('weight_finite')}); {nf['affected_count']} modules affected after it."]
    scanned = v.get("stored", {})
    if scanned.get("findings") or scanned.get("notes"):
        lines += ["", f"## {name}: stored tensors", "", "Read from the checkpoint's files before any forward; a noted "
                  "problem fails nothing (a pruned base stores it too), the forward judges it.", "",
                  "| module | tensor | problem | count | fails the recipe |", "| --- | --- | --- | --- | --- |"]
        lines += [f"| {code(f['module'])} | {code(f['tensor'])} | {f['problem']} | {f['count']:,} | {fails} |"
                  for key, fails in (("findings", "yes"), ("notes", "no")) for f in scanned.get(key, [])]
    if v.get("generations"):
        lines += ["", f"## {name}: greedy generations", "", "| prompt | reference | " + name + " |", "| --- | --- | --- |"]
        lines += [f"| {g['prompt']} | {text(g['reference'])} | {text(g['quantized'])} |" for g in v["generations"]]
    if long := v.get("long"):
        lines += ["", f"## {name}: long sequences", "", f"Teacher-forced on {long['sequences']} sequences of up to "
                  f"{long['longest']:,} tokens (WikiText-2 stretches and the reference's long greedy generations), "
                  "against the reference's top-k; buckets past the first are judged by the recipe's thresholds.", "",
                  *table(["positions", "compared", "KL mean", "top-1 agreement"],
                         [[f"{r['from']:,}-{r['to']:,}", str(r["positions"]), num(r["kl_mean"], ".4f", "non-finite"),
                           num(r["top1_agreement"], ".3f")] for r in long["buckets"]])]
        lines += ["", *table(["long generation", "tokens", "repetition (ref / this)", "distinct-2 (ref / this)",
                              "entropy (ref / this)"],
                             [[g["prompt"], str(g["quantized"]["tokens"])] + [
                                 f"{g['reference'][k]:.3f} / {g['quantized'][k]:.3f}" for k in
                                 ("repetition", "distinct_2", "entropy")] for g in long["generations"]])]
    for tower, t in v.get("towers", {}).items():
        lines += ["", f"## {name}: {tower} ({t.get('verdict')})", "", tower_measures(t, "Embedding cosine") + ".", "",
                  f"| {t['kind']} prompt | reference | {name} |", "| --- | --- | --- |"]
        lines += [f"| {a['prompt']} | {text(a['reference'])} | {text(a['quantized'])} |" for a in t["answers"]]
    return lines
