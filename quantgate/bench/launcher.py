"""Running a measurement in fresh processes (quantgate.bench.worker) under the step's timeout: its result, or a
record of how the process died; several processes, the one with the median decode figure and their spread."""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path

from quantgate.bench.worker import Spec, limits_of
from quantgate.files import write_json

log = logging.getLogger("quantgate.benchmark")


def measured_in_processes(name: str, spec: Spec, out: Path, processes: int) -> dict:
    """The measurement in `processes` fresh processes: the one with the median decode figure, with every
    process's figure and their spread, (max - min) / median, in its latency (one process: its repeats' spread)."""
    if processes == 1:
        return run_measurement(name, spec, out / "benchmark.json")
    results = [run_measurement(name, spec, out / f"benchmark-process{i}.json") for i in range(1, processes + 1)]
    if failed := next((r for r in results if r["status"] != "ok"), None):
        return failed
    results.sort(key=lambda r: r["latency"]["decode_ms_per_token"])
    chosen = results[(len(results) - 1) // 2]
    figures = [r["latency"]["decode_ms_per_token"] for r in results]
    chosen["latency"].update(decode_ms_by_process=figures,
                             decode_spread=round((max(figures) - min(figures)) / chosen["latency"]["decode_ms_per_token"], 4),
                             decode_spread_over="processes")
    write_json(out / "benchmark.json", {k: v for k, v in chosen.items() if k != "status"})
    return chosen


def measurement_env(spec: Spec) -> dict:
    # The worker runs in the measurement's folder (below); quantgate is imported from where this file is.
    project = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH")) if p)}
    if spec.inductor_cache:
        # set over any inherited value: inductor writes its /tmp default into the environment once used
        env["TORCHINDUCTOR_CACHE_DIR"] = spec.inductor_cache
    return env


def run_measurement(name: str, spec: Spec, result_path: Path) -> dict:
    """`python -m quantgate.bench.worker SPEC OUT` under the step's timeout; its result, or a record of its error."""
    out, result_path = Path(spec.out_dir).resolve(), result_path.resolve()
    spec = spec.model_copy(update={"out_dir": str(out)})
    settings, spec_path = spec.settings, result_path.with_name(result_path.stem + "-spec.json")
    write_json(spec_path, spec.model_dump(mode="json"))
    result_path.unlink(missing_ok=True)
    tail: deque[str] = deque(maxlen=40)
    # In the measurement's folder: what a library writes to a relative path stays in the run (peft 0.21 copies an
    # offloaded checkpoint's weights to its absolute path made relative when it loads an adapter onto them).
    proc = subprocess.Popen([sys.executable, "-m", "quantgate.bench.worker", str(spec_path), str(result_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=out,
                            env=measurement_env(spec))

    def pump():
        for line in proc.stderr:
            tail.append(line.rstrip())
            if line.startswith("benchmark"):
                log.info("%s: %s", name, line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=settings.timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"status": "error", "reason": f"the benchmark process ran past {settings.timeout_s:g} s"}
    finally:
        reader.join(timeout=5)
        shutil.rmtree(out / "offload", ignore_errors=True)
    limits = limits_of(settings)
    if code != 0 or not result_path.is_file():
        error = next((line for line in reversed(tail) if re.match(r"^[\w.]+(Error|Exception)\b", line)), None) \
            or (tail[-1] if tail else "no output")
        why = "killed (out of memory?)" if code in (-9, 137) else f"exit code {code}"
        return {"status": "error", "reason": f"the benchmark process failed ({why}): {error}"
                + (f"; under the limits {limits}" if limits else ""), "limits": limits, "log_tail": list(tail)[-15:]}
    return {"status": "ok", **json.loads(result_path.read_text())}
