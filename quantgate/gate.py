"""The nightly regression gate: each cell of a recorded run against the last passing cell of the same model,
recipe and settings. A failure, a non-finite output, a significant drop of a paired evaluation, KL, memory and
latency beyond their limits are regressions; latency is judged only where both runs measured its spread over
fresh processes on a machine they had to themselves, and the gate says where it did not judge."""
from __future__ import annotations

from pathlib import Path

from quantgate import evaluations
from quantgate.environment import packages
from quantgate.formats import num, text
from quantgate.history import last_passing, passing_elsewhere, run_env, run_cells
from quantgate.settings import GateSettings


def env_changes(before: dict, after: dict) -> list[str]:
    keys = ["python", *packages()]  # every distribution a registered backend or evaluation runs on
    changes = [f"{k} {before.get(k)} → {after.get(k)}" for k in keys if before.get(k) != after.get(k)]
    device_before, device_after = before.get("device", {}).get("name"), after.get("device", {}).get("name")
    if device_before != device_after:
        changes.append(f"device {device_before} → {device_after}")
    return changes


def _grew(now, base, fraction: float) -> bool:
    return now is not None and base is not None and base > 0 and now > base * (1 + fraction)


def dropped(cell: dict, evaluation) -> bool:
    """Whether a cell's paired evaluation got worse against its reference, significantly."""
    delta = cell.get(f"{evaluation.name}_delta") or 0
    worse = delta < 0 if evaluation.higher_is_better else delta > 0
    return bool(cell.get(f"{evaluation.name}_significant")) and worse


def weak_evaluations(cell: dict, gate: GateSettings) -> list[str]:
    """The paired evaluations whose "no significant drop" is too weak to mean no drop: a drop larger than
    gate.weak_power could have gone unseen at the n they ran."""
    weak = []
    for e in evaluations.registered():
        mde = cell.get(f"{e.name}_mde")  # None: a record from before it was measured
        if e.paired and mde is not None and not cell.get(f"{e.name}_significant") and mde > gate.weak_power:
            weak.append(f"{e.label}: no significant drop, but a drop under {100 * mde:.1f} points could go unseen "
                        f"(80% power): too weak to mean no drop of {100 * gate.weak_power:.0f}")
    return weak


def latency_limit(cell: dict, baseline: dict, gate: GateSettings) -> float:
    """How far decode latency may rise before it is a regression: the gate's fraction, or the spread the two
    runs measured across processes (times gate.latency_spread_multiple) where that is wider."""
    spreads = [s for s in (cell.get("decode_spread"), baseline.get("decode_spread")) if s is not None]
    return max([gate.latency_increase] + [gate.latency_spread_multiple * s for s in spreads])


def unjudged_latency(cell: dict, baseline: dict) -> str | None:
    """Why the two runs' latencies cannot be compared, or None."""
    if cell.get("decode_ms") is None or baseline.get("decode_ms") is None:
        return None
    if 0 in (cell.get("latency_comparable"), baseline.get("latency_comparable")):
        return "decode latency not judged: other processes shared the machine while one of the runs measured it"
    if "processes" not in (cell.get("decode_spread_over"), baseline.get("decode_spread_over")) or \
            cell.get("decode_spread_over") != baseline.get("decode_spread_over"):
        return ("decode latency not judged: its spread was not measured over fresh processes in both runs (set "
                "steps.benchmark.processes: 3 or more to gate on it)")
    return None


def unjudged_kl(cell: dict, baseline: dict) -> str | None:
    """Why the two runs' KL cannot be compared, or None: computed in other dtypes (`compute_dtype: auto` resolves per
    host), the dtype alone moves it about as far as an 8-bit recipe does (docs/validation.md, "The KL's own floor")."""
    mine, theirs = cell.get("compute_dtype"), baseline.get("compute_dtype")
    if mine and theirs and mine != theirs:
        return f"KL not judged: computed in {mine} in this run and in {theirs} in the baseline's"
    return None


def regressions(cell: dict, baseline: dict, gate: GateSettings) -> list[str]:
    """What got worse from the baseline cell to this one, each in a sentence."""
    found = []
    if cell["status"] != "passed":
        found.append(f"status {baseline['status']} → {cell['status']}: {cell.get('reason') or ''}".rstrip(": "))
    if cell["nonfinite_module"]:
        found.append(f"non-finite output, first at {cell['nonfinite_module']}")
    for e in evaluations.registered():
        if e.paired and dropped(cell, e) and not dropped(baseline, e):
            low, high = cell.get(f"{e.name}_low"), cell.get(f"{e.name}_high")
            found.append(f"significant {e.label} drop: {cell[e.name + '_delta']:+.4f}"
                         + (f" [{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else "")
                         + f" (baseline {num(baseline.get(e.name + '_delta'), '+.4f', 'not measured')}, not significant)")
    if unjudged_kl(cell, baseline) is None and _grew(cell["kl_mean"], baseline["kl_mean"], gate.kl_increase):
        found.append(f"KL mean {baseline['kl_mean']:.4f} → {cell['kl_mean']:.4f} (more than +{gate.kl_increase:.0%})")
    for key, label in (("real_bytes", "weight memory"), ("peak_memory", "peak memory")):
        if _grew(cell[key], baseline[key], gate.memory_increase):
            found.append(f"{label} {baseline[key] / 1e9:.3f} → {cell[key] / 1e9:.3f} GB "
                         f"(+{cell[key] / baseline[key] - 1:.1%}, limit +{gate.memory_increase:.0%})")
    limit = latency_limit(cell, baseline, gate)
    if unjudged_latency(cell, baseline) is None and _grew(cell["decode_ms"], baseline["decode_ms"], limit):
        found.append(f"decode latency {baseline['decode_ms']:.2f} → {cell['decode_ms']:.2f} ms/token "
                     f"(+{cell['decode_ms'] / baseline['decode_ms'] - 1:.1%}, limit +{limit:.1%})")
    return found


def gate_cell(db: str | Path, cell: dict, env: dict, gate: GateSettings) -> dict:
    """One cell's verdict: skipped | baseline | pass | regressed, with its regressions and what it did not judge."""
    empty = {"regressions": [], "baseline_run": None, "env_changes": [], "notes": []}
    if cell["status"] in ("skipped", "interrupted"):  # nothing measured to gate
        return {**cell, **empty, "gate": "skipped"}
    baseline = last_passing(db, cell)
    if baseline is None:
        others = passing_elsewhere(db, cell)
        notes = [f"{others} earlier passing runs had other settings: not compared"] if others else []
        return {**cell, **empty, "gate": "baseline", "notes": notes + weak_evaluations(cell, gate)}
    found = regressions(cell, baseline, gate)
    notes = [why for why in (unjudged_kl(cell, baseline), unjudged_latency(cell, baseline)) if why]
    notes += weak_evaluations(cell, gate)
    return {**cell, "gate": "regressed" if found else "pass", "regressions": found, "notes": notes,
            "baseline_run": baseline["run_id"], "env_changes": env_changes(run_env(db, baseline["run_id"]), env)}


def gate_run(db: str | Path, run_id: str, gate: GateSettings) -> list[dict]:
    """Each cell of a recorded run against its baseline."""
    env = run_env(db, run_id)
    return [gate_cell(db, cell, env, gate) for cell in run_cells(db, run_id)]


def summary(nightly_id: str, runs: list[dict], results: list[dict], missing: list[dict], board: Path) -> str:
    """The nightly's Markdown summary: each cell's gate, baseline, regressions, what was not judged and why."""
    lines = [f"# quantgate nightly {nightly_id}", "", f"{len(runs)} cells, {len({c['run_id'] for c in results})} runs "
             f"recorded; dashboard: `{board}`", "",
             "| model | recipe | status | gate | baseline | regressions | not judged | environment changes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in results:
        cells = [c["model"], c["recipe"], c["status"], c["gate"], c["baseline_run"] or "–",
                 "; ".join(c["regressions"]) or "–", "; ".join(c["notes"]) or "–", "; ".join(c["env_changes"]) or "–"]
        lines.append("| " + " | ".join(text(x) for x in cells) + " |")
    return "\n".join(lines + [f"- cell {text(r['cell'])}: flow run ended {r['state']}" for r in missing])


def failures(results: list[dict], missing: list[dict]) -> list[str]:
    """What fails the nightly: each regression, with the environment change beside it, and each cell that did
    not finish."""
    return [f"{c['model']} {c['recipe']}: {', '.join(c['regressions'])}"
            + (f" (with {', '.join(c['env_changes'])})" if c["env_changes"] else "")
            for c in results if c["gate"] == "regressed"] + [f"{r['cell']}: {r['state']}" for r in missing]
