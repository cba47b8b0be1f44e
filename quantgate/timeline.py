"""Where a run's time went (timeline.png): each step's span from the record's start, the model's steps on the first
row and each recipe's on its own, with the benchmarks' waits for the device and their time alone on it."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from quantgate.figure import plain, pyplot, saved

# One colour a step, the same in every run's figure.
COLOURS = {"download": "#8c8c8c", "reference": "#4c72b0", "quantize": "#dd8452", "generate": "#c9a0dc",
           "validate": "#55a868", "adapters": "#8172b3", "evaluate": "#937860", "benchmark": "#da8bc3",
           "publish": "#64b5cd", "remedy": "#ccb974"}
WAITING, ALONE = "waiting to time alone", "timing alone"  # drawn inside a benchmark's bar
COLOURS.update({WAITING: "#d9d9d9", ALONE: "#222222"})


@dataclass(frozen=True)
class Span:
    row: str  # "model" or a recipe's name
    label: str  # a step, WAITING or ALONE
    start_s: float  # from the record's start
    seconds: float
    status: str = "ok"


def seconds_between(start: str, at: str) -> float:
    return (datetime.fromisoformat(at) - datetime.fromisoformat(start)).total_seconds()


def step_span(origin: str, row: str, label: str, step: dict) -> Span | None:
    """A step's span where the record says when it started and for how long (a step not run has neither)."""
    if not step.get("started_at") or step.get("seconds") is None:
        return None
    return Span(row, label, seconds_between(origin, step["started_at"]), step["seconds"], step.get("status", "ok"))


def alone_spans(origin: str, row: str, benchmark: dict) -> list[Span]:
    """A benchmark's wait for the device alone, and its time alone on it, where the record has them."""
    alone = benchmark.get("alone") or {}
    if not alone.get("started_at") or alone.get("seconds") is None:
        return []
    start = seconds_between(origin, alone["started_at"])
    waited = [Span(row, WAITING, start - alone["waited_s"], alone["waited_s"])] if alone.get("waited_s") else []
    return waited + [Span(row, ALONE, start, alone["seconds"])]


def spans(metrics: dict) -> list[Span]:
    """Every step's span in the record, in rows: the model's (download, reference, its benchmark), then each recipe's."""
    origin, ref = metrics["started_at"], metrics["reference"]
    found = [step_span(origin, "model", "download", metrics["model"].get("download") or {}),
             step_span(origin, "model", "reference", ref),
             step_span(origin, "model", "benchmark", ref.get("benchmark") or {})]
    found += alone_spans(origin, "model", ref.get("benchmark") or {})
    for name, entry in metrics["recipes"].items():
        found += [step_span(origin, name, step, result) for step, result in entry.get("steps", {}).items()]
        found += alone_spans(origin, name, entry.get("benchmark") or {})
    return [s for s in found if s is not None]


def time_to_verdict(metrics: dict) -> float | None:
    """Seconds from the record's start to its finish; None for a run not finished."""
    if not metrics.get("finished_at"):
        return None
    return seconds_between(metrics["started_at"], metrics["finished_at"])


def plot_timeline(metrics: dict, path: Path) -> Path | None:
    """Each row's steps as bars on one time axis, a benchmark's wait and time alone drawn inside its bar, failed steps
    hatched, the finish marked. None where the record has no step's span."""
    from matplotlib.patches import Patch

    plt = pyplot()

    found = spans(metrics)
    if not found:
        return None
    rows = list(dict.fromkeys(s.row for s in found))
    fig, ax = plt.subplots(figsize=(12, 1.6 + 0.5 * max(len(rows), 4)))
    for span in found:
        y = rows.index(span.row)
        height = 0.3 if span.label in (WAITING, ALONE) else 0.7  # inside the benchmark's bar: thinner, on top
        hatch = None if span.status in ("ok", "skipped") else "xx"
        ax.broken_barh([(span.start_s, span.seconds)], (y - height / 2, height),
                       facecolors=COLOURS.get(span.label, "#999999"), hatch=hatch,
                       edgecolor="white" if hatch is None else "#c44e52", linewidth=0.5)
    finish = time_to_verdict(metrics)
    if finish is not None:
        ax.axvline(finish, color="#c44e52", linewidth=1)
        ax.annotate(f"verdict at {finish:.0f} s", (finish, len(rows) - 0.5), textcoords="offset points",
                    xytext=(-4, 2), ha="right", fontsize=8, color="#c44e52")
    labels = [step for step in COLOURS if step in (WAITING, ALONE) or any(s.label == step for s in found)]
    legend = [Patch(facecolor=COLOURS[label], label=label) for label in labels]
    if any(s.status not in ("ok", "skipped") for s in found):
        legend.append(Patch(facecolor="white", edgecolor="#c44e52", hatch="xx", label="did not end ok"))
    ax.legend(handles=legend, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_yticks(range(len(rows)), [plain(r) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("seconds from the run's start")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(plain(f"{metrics['model']['source']} — run {metrics['run_id']}: where the time went"))
    return saved(fig, path)
