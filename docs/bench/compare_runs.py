"""Two run records side by side: each recipe's status, verdict and KL mean (to three digits), and every key path
of metrics.json that one has and the other lacks (lists compared by their first element). For checking that a
change of code left the record and the verdicts as they were.

    python docs/bench/compare_runs.py RUN_DIR_BEFORE RUN_DIR_AFTER
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def paths(value, prefix: str = "") -> set[str]:
    if isinstance(value, dict):
        return {p for k, v in value.items() for p in paths(v, f"{prefix}.{k}" if prefix else str(k))} | {prefix}
    if isinstance(value, list) and value:
        return paths(value[0], f"{prefix}[]") | {prefix}
    return {prefix}


def main(before: Path, after: Path) -> int:
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (before, after))
    same = True
    print(f"{'recipe':28} {'status':16} {'verdict':12} KL mean (3 digits)")
    for name in dict.fromkeys([*a["recipes"], *b["recipes"]]):
        ra, rb = a["recipes"].get(name, {}), b["recipes"].get(name, {})
        va, vb = ra.get("validate", {}), rb.get("validate", {})
        kla, klb = (f"{v['kl_mean']:.3f}" if v.get("kl_mean") is not None else "–" for v in (va, vb))
        row = [(ra.get("status"), rb.get("status")), (va.get("verdict"), vb.get("verdict")), (kla, klb)]
        same &= all(x == y for x, y in row)
        print(f"{name:28} " + " ".join(f"{f'{x} / {y}':16}" for x, y in row))
    # Run-specific keys (ids, times, paths) are the same keys with other values; these are the keys themselves.
    only_a, only_b = sorted(paths(a) - paths(b)), sorted(paths(b) - paths(a))
    print(f"\nkeys only before ({len(only_a)}):", *only_a, sep="\n  ")
    print(f"keys only after ({len(only_b)}):", *only_b, sep="\n  ")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
