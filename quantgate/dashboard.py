"""A static HTML dashboard from the run history: the latest matrix coloured pass/warn/fail, a trend
chart per metric for each model and recipe, links to each run's report and card. Plain HTML and
inline SVG, so it opens offline (no CDN, no script)."""
from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path

from quantgate import evaluations, history
from quantgate.files import write_atomic
from quantgate.formats import num

COLOURS = {"pass": "#2e9d4f", "warn": "#e0a31b", "fail": "#d2362f", "skipped": "#9a9a9a"}
TRENDS = (("kl_mean", "KL mean", "{:.4f}"), ("peak_memory", "peak memory (GB)", "{:.3f}"),
          ("decode_ms", "decode ms/token", "{:.2f}"), ("tower_cosine", "worst tower's embedding cosine", "{:.4f}"))
ALWAYS = {"mmlu_value", "kl_mean", "peak_memory", "decode_ms"}  # the rest: no trend where never measured


def trends() -> list[tuple[str, str, str]]:
    """Each registered evaluation's headline, then the cell's own figures."""
    return [(f"{e.name}_value", e.label, "{:" + e.fmt + "}") for e in evaluations.registered()] + list(TRENDS)


def light(cell: dict) -> str:
    if cell.get("gate") == "regressed":  # what the nightly gate decided, whatever the run's own verdict
        return "fail"
    if cell["status"] in ("skipped", "interrupted"):  # no verdict to light
        return "skipped"
    if cell["status"] != "passed":
        return "fail"
    return "warn" if cell["verdict"] == "warn" else "pass"


def why(cell: dict) -> str:
    """The cell's tooltip: its regressions where the gate found some, else its reason."""
    regressed = json.loads(cell.get("regressions") or "[]") if cell.get("gate") == "regressed" else []
    return "; ".join(["regressed: " + r for r in regressed] + [cell["reason"] or ""]).strip("; ")


def sparkline(values: list[float], label: str, fmt: str, width: int = 220, height: int = 60) -> str:
    points = [v for v in values if v is not None]
    if not points:
        return f'<div class="trend"><b>{html.escape(label)}</b><br><i>not measured</i></div>'
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    step = (width - 20) / max(len(values) - 1, 1)
    coords = [(10 + i * step, height - 10 - (v - low) / span * (height - 20)) for i, v in enumerate(values) if v is not None]
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5"/>' for x, y in coords)
    return (f'<div class="trend"><b>{html.escape(label)}</b> {fmt.format(points[-1])}<br>'
            f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
            f'<polyline fill="none" stroke="#3b6fb6" stroke-width="2" points="{path}"/>{dots}</svg></div>')


def render(db: str | Path) -> str:
    rows = list(reversed(history.cells(db)))  # oldest first
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for cell in rows:
        series[(cell["model"], cell["recipe"])].append(cell)
    models = sorted({m for m, _ in series})
    recipes = sorted({r for _, r in series})
    out = ["<!doctype html><html><head><meta charset='utf-8'><title>quantgate dashboard</title><style>",
           "body{font-family:sans-serif;margin:2em;color:#222} table.matrix{border-collapse:collapse}",
           "table.matrix td,table.matrix th{border:1px solid #ccc;padding:6px 10px;font-size:13px}",
           ".cell a{color:#fff} .cell{color:#fff} .trend{display:inline-block;margin:4px 12px 8px 0;font-size:12px}",
           "svg.chart{background:#f6f8fb} circle{fill:#3b6fb6} h3{margin-bottom:2px}",
           "</style></head><body><h1>quantgate</h1>",
           f"<p>{len({c['run_id'] for c in rows})} runs, {len(rows)} cells in <code>{html.escape(str(db))}</code>.</p>",
           "<h2>Latest matrix</h2><table class='matrix'><tr><th>model</th>"]
    out += [f"<th>{html.escape(r)}</th>" for r in recipes] + ["</tr>"]
    for model in models:
        out.append(f"<tr><th>{html.escape(model)}</th>")
        for recipe in recipes:
            cells = series.get((model, recipe))
            if not cells:
                out.append("<td></td>")
                continue
            last = cells[-1]
            state = light(last)
            report = Path(last["run_dir"]) / "report.md"
            detail = [f"{e.label} {last[e.name + '_delta']:+.3f}" for e in evaluations.registered()
                      if last.get(e.name + "_delta") is not None]
            if last["decode_ms"] is not None:
                detail.append(f"{last['decode_ms']:.1f} ms/tok")
            if last["tower"]:
                detail.append(f"{last['tower'].split('.')[-1]} cos {num(last['tower_cosine'], '.3f')}")
            links = f"<a href='{report.as_uri()}'>report</a>" + (
                f" · <a href='{Path(last['card']).as_uri()}'>card</a>" if last["card"] else "")
            out.append(f"<td class='cell {state}' style='background:{COLOURS[state]}' title='{html.escape(why(last))}'>"
                       f"<b>{state}</b><br>{html.escape(', '.join(detail))}<br>{links}</td>")
        out.append("</tr>")
    out.append("</table><h2>Trends</h2>")
    for (model, recipe), cells in sorted(series.items()):
        out.append(f"<h3>{html.escape(model)} · {html.escape(recipe)}</h3><p>{len(cells)} runs, last "
                   f"{html.escape(cells[-1]['run_id'])}</p>")
        for key, label, fmt in trends():
            if key not in ALWAYS and all(c.get(key) is None for c in cells):
                continue
            values = [c[key] / 1e9 if key == "peak_memory" and c[key] is not None else c[key] for c in cells]
            out.append(sparkline(values, label, fmt))
    out.append("</body></html>")
    return "\n".join(out)


def write(db: str | Path, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, render(db))
