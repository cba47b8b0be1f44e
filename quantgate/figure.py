"""The run's figure (summary.png): each recipe's MMLU delta against its memory and its decode speedup."""
from __future__ import annotations

import io
from pathlib import Path

from quantgate.files import write_atomic


def plot_run(metrics: dict, path: Path) -> Path | None:
    """Each recipe's MMLU delta (95% CI) against its memory and its decode speedup; the reference at
    zero. None when no recipe has both an evaluation and a benchmark."""
    plt = pyplot()
    ref = metrics["reference"]
    points = []
    for name, entry in metrics["recipes"].items():
        m, b = entry.get("evaluate", {}).get("mmlu", {}), entry.get("benchmark", {})
        if "delta_acc" in m and "memory" in b:
            memory = entry.get("quantize", {}).get("real_bytes")
            points.append((name, m["delta_acc"], m["delta_ci95"], memory, b["latency"].get("speedup_vs_reference")))
    if not points:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, xlabel, index, ref_x in ((axes[0], "weight memory (GB, real bytes)", 3, ref.get("real_bytes")),
                                     (axes[1], "decode speedup vs reference (x)", 4, 1.0)):
        for name, delta, (low, high), *xs in points:
            x = xs[index - 3]
            if x is None:
                continue
            x = x / 1e9 if index == 3 else x
            ax.errorbar(x, delta * 100, yerr=[[(delta - low) * 100], [(high - delta) * 100]], fmt="o", capsize=4)
            ax.annotate(name, (x, delta * 100), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if ref_x is not None:
            ref_x = ref_x / 1e9 if index == 3 else ref_x
            ax.plot([ref_x], [0], marker="*", markersize=14, color="black", label="reference")
            ax.legend(loc="lower right", fontsize=8)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("MMLU delta vs reference (points, 95% CI)")
    fig.suptitle(plain(f"{metrics['model']['source']} — run {metrics['run_id']}"))
    return saved(fig, path)


def pyplot():
    """matplotlib's pyplot on its file-only backend: a run draws with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(name: str) -> str:
    """A name as text, never mathtext: a `$` in a folder name would be parsed as math (and fail to render)."""
    return name.replace("$", r"\$")


def saved(fig, path: Path) -> Path:
    """The figure laid out and written as a PNG, whole or not at all; closed."""
    plt = pyplot()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, png.getvalue())
