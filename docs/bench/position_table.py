"""Each recipe's drift by position bucket and its long generations' repetition, from a run's record, as one Markdown
table (docs/validation.md, "Where damage hides").

    python docs/bench/position_table.py RUN_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    measured = {n: e["validate"]["long"] for n, e in metrics["recipes"].items() if e.get("validate", {}).get("long")}
    if not measured:
        sys.exit(f"{run_dir}: no recipe has long-sequence figures (steps.validate.long_context unset?)")
    spans = list(dict.fromkeys(f"{r['from']:,}-{r['to']:,}" for long in measured.values() for r in long["buckets"]))
    print("| recipe | verdict | " + " | ".join(f"KL {s} (top-1)" for s in spans) + " | repetition (reference) |")
    print("| --- | --- |" + " --- |" * (len(spans) + 1))
    for name, long in measured.items():
        cells = {f"{r['from']:,}-{r['to']:,}": f"{r['kl_mean']:.4f} ({r['top1_agreement']:.3f})" if r["kl_mean"] is not None
                 else "non-finite" for r in long["buckets"]}
        repeats = ", ".join(f"{g['quantized']['repetition']:.2f} ({g['reference']['repetition']:.2f})"
                            for g in long["generations"])
        verdict = metrics["recipes"][name]["validate"]["verdict"]
        print(f"| {name} | {verdict} | " + " | ".join(cells.get(s, "–") for s in spans) + f" | {repeats} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
