"""docs/gpu/real_bytes.png from docs/gpu/output/*.jsonl: each recipe's real bytes against what
transformers' get_memory_footprint() reports, as a fraction of the bf16 reference."""
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

here = Path(__file__).parent
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
for ax, name, title in zip(axes, ["smollm2", "g3"], ["SmolLM2-135M-Instruct", "Gemma-3-12B-shaped (random)"]):
    rows = [json.loads(line) for line in (here / "output" / f"{name}.jsonl").read_text().splitlines()
            if line.startswith("{")]
    ref = next(r["reference_real_bytes"] for r in rows if "reference_real_bytes" in r)
    done = [r for r in rows if r.get("status") == "ok"]
    labels = [r["recipe"] for r in done]
    x = range(len(done))
    ax.bar([i - 0.2 for i in x], [r["real_bytes"] / ref for r in done], 0.4, label="real bytes (quantgate)")
    ax.bar([i + 0.2 for i in x], [r["footprint_reported_by_transformers"] / ref for r in done], 0.4,
           label="get_memory_footprint()", color="lightgray")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xticks(list(x), labels, rotation=35, ha="right", fontsize=8)
    ax.set_title(f"{title}\nreference {ref / 1e9:.2f} GB bf16, H100")
axes[0].set_ylabel("weight bytes / bf16 reference")
axes[0].legend(fontsize=8)
fig.tight_layout()
fig.savefig(here / "real_bytes.png", dpi=110)
