"""The run record (../shared/contract/run-record.md): runs/<run_id>/ with config.yaml, env.json,
metrics.json (always written atomically), report.md and <recipe>/plan.json."""
from __future__ import annotations

import os
import platform
import secrets
import shutil
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from quantgate import backends
from quantgate.config import RunConfig, dump_config
from quantgate.files import under, write_atomic, write_json
from quantgate.formats import context_line, gb, kl_line, num, peak_memory, tower_measures
from quantgate.plan import tower_lines
from quantgate.runlog import announce

SCHEMA = 1
STEPS = ("quantize", "validate", "evaluate", "benchmark", "publish")
# The core's distributions; each backend's come from the registry.
PACKAGES = ("torch", "transformers", "accelerate", "lm_eval", "prefect", "safetensors", "huggingface_hub", "gguf")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def environment() -> dict:
    import psutil
    import torch

    env = {"python": platform.python_version()}
    for name in [*PACKAGES, *backends.packages()]:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["host"] = {"platform": platform.platform(), "cpu_cores": os.cpu_count(),
                   "memory_bytes": psutil.virtual_memory().total}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda,
                         "count": torch.cuda.device_count(), "driver": _nvidia_driver()}
    else:
        env["device"] = {"name": "cpu", "cuda": None}
    return env


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None


class RunRecord:
    def __init__(self, config: RunConfig, config_path: str, nightly_id: str | None = None):
        self.run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
        self.dir = Path(config.output.runs_dir).resolve() / self.run_id
        self.dir.mkdir(parents=True)
        (self.dir / "config.yaml").write_text(f"# resolved from {config_path}\n" + dump_config(config))
        write_json(self.dir / "env.json", environment())
        self.metrics = {"schema": SCHEMA, "run_id": self.run_id, "status": "running", "started_at": now(),
                        "finished_at": None, "config_path": str(config_path), "nightly_id": nightly_id,
                        "model": {"source": config.model.source, "revision": config.model.revision},
                        "reference": {}, "recipes": {}}
        for recipe in config.recipes:
            self.metrics["recipes"][recipe.name] = {
                "status": "pending", "steps": {s: {"status": "not_run"} for s in STEPS}}
        self.save()

    def save(self) -> None:
        write_json(self.dir / "metrics.json", self.metrics)

    def recipe_dir(self, name: str) -> Path:
        return under(self.dir, name)

    def set_model(self, download: dict) -> None:
        model = self.metrics["model"]
        model["download"] = _step_view(download)
        if download["status"] == "ok":
            model.update({k: download.get(k) for k in ("revision", "checkpoint_sha256", "checkpoint", "base_model",
                                                       "license")})
        else:
            self._settle_recipes("error", f"download: {download['reason']}")
        self.save()

    def set_reference(self, result: dict) -> None:
        self.metrics["reference"] = result
        if result["status"] != "ok":  # nothing to compare a recipe with: none runs, none reads passed
            self._settle_recipes("error", f"reference: {result.get('reason', '')}")
        self.save()

    def set_base_broken(self, reason: str) -> None:
        """The unquantized model itself goes non-finite: no recipe's verdict could mean anything, so none runs."""
        self.metrics["base_broken"] = reason
        self._settle_recipes("skipped", f"not run: {reason}")
        self.save()

    def _settle_recipes(self, status: str, reason: str) -> None:
        """Every recipe ends here, before any of its steps, for a reason of the model's."""
        for entry in self.metrics["recipes"].values():
            entry.update(status=status, reason=reason)

    def set_reference_benchmark(self, result: dict) -> None:
        self.metrics["reference"]["benchmark"] = result
        self.save()

    def set_step(self, recipe: str, step: str, result: dict) -> bool:
        """Record one step of a recipe; a step that did not end ok settles the recipe's status.
        Whether the step ended ok (and the recipe goes on)."""
        entry = self.metrics["recipes"][recipe]
        entry["steps"][step] = _step_view(result)
        measured = {k: v for k, v in result.items() if k not in ("status", "reason", "seconds", "cached", "warnings")}
        if measured:
            entry[step] = measured
        entry.setdefault("warnings", []).extend(f"{step}: {w}" for w in result.get("warnings", []))
        # A step the config turned off (not_run) says so in its own entry and leaves the recipe's status.
        if result["status"] not in ("ok", "not_run"):
            entry["status"] = {"failed": "failed", "skipped": "skipped"}.get(result["status"], "error")
            entry["reason"] = f"{step}: {result.get('reason', '')}"
        self.save()
        return result["status"] == "ok"

    def interrupt(self, why: str) -> None:
        """A stopped run (SIGINT, SIGTERM): the record says so and where each recipe had got to; half-written
        files (*.tmp) go, so nothing in the run folder reads as finished that is not."""
        for path in sorted(self.dir.rglob("*.tmp"), reverse=True):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        for entry in self.metrics["recipes"].values():
            if entry["status"] == "pending":
                reached = next((s for s in STEPS if entry["steps"][s]["status"] == "not_run"), STEPS[-1])
                entry.update(status="interrupted", reason=f"the run was stopped ({why}) before {reached} finished")
        self.metrics.update(status="interrupted", reason=f"stopped by {why}", finished_at=now())
        self.save()
        write_report(self.dir, self.metrics)

    def model_errored(self) -> bool:
        """Whether one of the model's own steps (download, reference, the reference's benchmark) errored."""
        ref = self.metrics["reference"]
        steps = [self.metrics["model"].get("download"), ref or None, ref.get("benchmark") if ref else None]
        return any(s is not None and s["status"] not in ("ok", "skipped", "not_run") for s in steps)

    def finish(self) -> dict:
        for entry in self.metrics["recipes"].values():
            if entry["status"] == "pending":
                entry["status"] = "passed"
            for step in STEPS:
                state = entry["steps"][step]
                if state["status"] == "not_run" and "reason" not in state:
                    state["reason"] = f"the recipe stopped: {entry.get('reason', '')}"
        statuses = {e["status"] for e in self.metrics["recipes"].values()}
        statuses |= {"error"} if self.model_errored() else set()
        statuses |= {"failed"} if self.metrics.get("base_broken") else set()
        self.metrics["status"] = "error" if "error" in statuses else "failed" if "failed" in statuses else "passed"
        self.metrics["finished_at"] = now()
        self.save()
        write_report(self.dir, self.metrics)
        return self.metrics


def _step_view(result: dict) -> dict:
    # A step that could not run here (e.g. needs CUDA) is not_run, with the reason.
    view = {"status": "not_run" if result["status"] == "skipped" else result["status"],
            "seconds": result.get("seconds")}
    for key in ("reason", "cached"):
        if result.get(key) is not None:
            view[key] = result[key]
    return view


def run_step(step_task, step_settings, group: str, step: str, /, **params) -> dict:
    """Run a Prefect task with the step's timeout and retries, announcing its start and end (group is
    the recipe, or `model`); a crash becomes a record, not a raise."""
    announce(group, step, "start")
    result = _run_task(step_task, step_settings, **params)
    announce(group, step, "end", result["status"], result["seconds"], result.get("reason"))
    return result


def _run_task(step_task, step_settings, /, **params) -> dict:
    t0 = time.perf_counter()
    state = step_task.with_options(timeout_seconds=step_settings.timeout_s, retries=step_settings.retries)(
        **params, return_state=True)
    seconds = round(time.perf_counter() - t0, 2)
    if state.is_completed():
        result = dict(state.result())
        result.setdefault("status", "ok")
        return {**result, "seconds": seconds, "cached": state.name == "Cached"}
    error = state.result(raise_on_failure=False)
    if state.name == "TimedOut" or isinstance(error, TimeoutError):
        limit = f"steps.{step_settings.key}.timeout_s"
        reason = (f"timed out after {step_settings.timeout_s:g} s, the limit {limit}; raise it in the config or "
                  f"with --set {limit}={step_settings.timeout_s * 2:g}")
    elif isinstance(error, BaseException):
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = f"{state.name}: {state.message}"
    return {"status": "error", "reason": reason, "seconds": seconds}


# ---------------------------------------------------------------- the report

def _paired(evaluate: dict, name: str = "mmlu", score: str = "acc") -> str:
    """A score with its paired delta, interval and flips against the reference: `0.412 (-0.010 [-0.020, +0.000]; -12/+8)`."""
    m = evaluate.get(name, {})
    if score not in m:
        return "–"
    if "delta_acc" not in m:
        return f"{m[score]:.3f}"
    low, high = m["delta_ci95"]
    flipped = m.get("flips")  # answers lost and gained against the reference's
    return (f"{m[score]:.3f} ({m['delta_acc']:+.3f} [{low:+.3f}, {high:+.3f}]"
            + (f"; -{flipped['right_to_wrong']}/+{flipped['wrong_to_right']}" if flipped else "") + ")")


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


def summary_rows(metrics: dict) -> list[list[str]]:
    ref = metrics["reference"]
    ref_bytes = ref.get("real_bytes")
    ref_bench = ref.get("benchmark", {})
    ref_eval = ref.get("evaluate", {})
    rows = [["reference", ref.get("status", "–"), gb(ref_bytes), "100%", "", "", "", "", _paired(ref_eval),
             _paired(ref_eval, "humaneval", "pass_at_1"), num(ref_eval.get("wikitext", {}).get("word_perplexity"), ".2f"),
             _peak(ref_bench), _decode(ref_bench), ""]]
    for name, entry in metrics["recipes"].items():
        q, v, e, b = (entry.get(step, {}) for step in ("quantize", "validate", "evaluate", "benchmark"))
        ratio = f"{q['real_bytes'] / ref_bytes:.1%}" if q.get("real_bytes") and ref_bytes else "–"
        counts = f"{q['quantized_modules']}/{q['skipped_modules']}/{q['fallback_modules']}" if "quantized_modules" in q else "–"
        warnings = entry.get("warnings", [])
        note = entry.get("reason") or (f"{warnings[0]}" + (f" (+{len(warnings) - 1} more)" if len(warnings) > 1 else "")
                                       if warnings else "")
        if metrics.get("base_broken"):  # said once, under the table, not in every row
            note = "not run: the base model is broken"
        rows.append([name, entry["status"], gb(q.get("real_bytes")), ratio, counts, v.get("verdict", "–"),
                     num(v.get("kl_mean"), ".4f"), num(v.get("top1_agreement"), ".3f"), _paired(e),
                     _paired(e, "humaneval", "pass_at_1"),
                     num(e.get("wikitext", {}).get("word_perplexity"), ".2f"), _peak(b), _decode(b), note])
    return rows


SUMMARY_HEADER = ["recipe", "status", "real bytes", "of reference", "quantized/skipped/fallback", "verdict",
                  "KL mean", "top-1 vs ref", "MMLU (delta [95% CI]; flips)",
                  "HumanEval pass@1 (delta [95% CI]; flips)", "word ppl", "peak memory (vs ref)",
                  "decode ms/token (speedup)", "reason or warnings"]


KV_CACHE_HEADER = ["model", "budget", "cache", "context tokens", "decode ms/token there", "stopped by"]


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
            rows.append([name, "–", "–", "–", "–", _cell(context_line(kv))])
            continue
        for kind, c in kv["caches"].items():
            stopped = c.get("stopped_by") or c.get("reason", "")
            rows.append([name, f"{kv['budget'] / 2**30:g} GiB", kind, num(c.get("context_tokens"), ","),
                         num(c.get("decode_ms_per_token"), ".2f", c.get("decode_error", "–")), _cell(stopped)])
    return rows


BENCHMARK_HEADER = ["model", "load s", "host private peak", "host file-backed peak", "GPU peak load", "GPU peak infer",
                    "prefill ms", "decode ms/token", "tokens/s", "x bandwidth floor", "decode path"]


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


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()


def write_report(run_dir: Path, metrics: dict) -> None:
    """report.md and summary.png from the run's record (also `quantgate report RUN_DIR`)."""
    from quantgate.card import plot_run

    figure = plot_run(metrics, run_dir / "summary.png")
    write_atomic(run_dir / "report.md", render_report(metrics, figure.name if figure else None))


def render_report(metrics: dict, figure: str | None = None) -> str:
    model = metrics["model"]
    lines = [f"# quantgate run {metrics['run_id']}", "",
             f"- model: `{model['source']}` (revision `{model.get('revision')}`, checkpoint sha256 "
             f"`{str(model.get('checkpoint_sha256'))[:16]}…`)",
             f"- status: **{metrics['status']}**, {metrics['started_at']} → {metrics['finished_at']}",
             f"- computed in {metrics['reference'].get('compute_dtype', '–')} (checkpoint "
             f"{metrics['reference'].get('dtype', '–')}); everything the libraries printed: [run.log](run.log)", "",
             "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + " --- |" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(metrics)]
    if metrics.get("base_broken"):
        lines += ["", f"**{metrics['base_broken']}.** No recipe was run: none of their verdicts could mean anything."]
    if figure:
        lines += ["", f"![MMLU delta against memory and speed]({figure})"]
    ref = metrics["reference"]
    seconds = [("download", model.get("download", {}).get("seconds")), ("reference load", ref.get("load_s")),
               ("reference validate", ref.get("validate_s")), ("reference evaluate", ref.get("evaluate_s")),
               ("reference benchmark", ref.get("benchmark", {}).get("seconds"))]
    lines += ["", "## Steps", "", "Seconds of the model's steps: "
              + ", ".join(f"{what} {num(s, '.1f')}" for what, s in seconds) + ".",
              "", "| recipe | " + " | ".join(STEPS) + " |", "| --- |" + " --- |" * len(STEPS)]
    for name, entry in metrics["recipes"].items():
        cells = []
        for step in STEPS:
            s = entry["steps"][step]
            cells.append(s["status"] + (f" ({s['seconds']:.1f} s)" if s.get("seconds") is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    bench_rows = benchmark_rows(metrics)
    if bench_rows:
        floor = next((b for b in [metrics["reference"].get("benchmark", {})] if "copy_bandwidth" in b), {})
        lines += ["", "## Memory and latency", "",
                  "Each model in a fresh process, loaded (and quantized) as a user loads it; batch "
                  f"{floor.get('latency', {}).get('runs', [{}])[0].get('batch_size', '–')}, medians of the repeats. "
                  "Host private is RssAnon; file-backed is the memory-mapped checkpoint. The bandwidth floor is "
                  "the weight bytes read per token over the measured copy bandwidth"
                  + (f" ({floor['copy_bandwidth'] / 1e9:.0f} GB/s)." if floor else "."), "",
                  "| " + " | ".join(BENCHMARK_HEADER) + " |", "|" + " --- |" * len(BENCHMARK_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in bench_rows]
        for name, b in benches_of(metrics):
            lines += [f"- {name}: {d}" for d in b.get("diagnostics", [])]
    kv_rows = kv_cache_rows(metrics)
    if kv_rows:
        lines += ["", "## KV cache", "",
                  "The longest context (prompt and generated tokens) whose chunked prefill and decoding fit the memory "
                  "budget with the model loaded, per cache, found by prefilling until a chunk did not fit; decoding "
                  "one token at a time at that context.", "",
                  "| " + " | ".join(KV_CACHE_HEADER) + " |", "|" + " --- |" * len(KV_CACHE_HEADER)]
        lines += ["| " + " | ".join(row) + " |" for row in kv_rows]
        lines += [f"- {name}: {line}" for name, b in benches_of(metrics)
                  if (line := kl_line(b.get("kv_cache", {})))]
    tower_rows = [(name, line) for name, entry in metrics["recipes"].items()
                  for line in tower_lines(entry.get("quantize", {}).get("towers", {}))]
    if tower_rows:
        lines += ["", "## Towers", ""] + [f"- {name}: {line}" for name, line in tower_rows]
    for name, entry in metrics["recipes"].items():
        v = entry.get("validate", {})
        if v.get("nonfinite"):
            nf = v["nonfinite"]
            lines += ["", f"## {name}: non-finite", "",
                      f"First non-finite module: `{nf['first_nonfinite_module']}` (prompt `{nf['prompt']}`; input "
                      f"{nf.get('input_dtype')}, max |x| {nf.get('input_max_abs')}, input finite: {nf.get('input_finite')}, "
                      f"weight finite: {nf.get('weight_finite')}); {nf['affected_count']} modules affected after it."]
        if v.get("generations"):
            lines += ["", f"## {name}: greedy generations", "", "| prompt | reference | " + name + " |",
                      "| --- | --- | --- |"]
            lines += [f"| {g['prompt']} | {_cell(g['reference'])} | {_cell(g['quantized'])} |" for g in v["generations"]]
        for tower, t in v.get("towers", {}).items():
            lines += ["", f"## {name}: {tower} ({t.get('verdict')})", "",
                      tower_measures(t, "Embedding cosine") + ".", "",
                      f"| {t['kind']} prompt | reference | {name} |", "| --- | --- | --- |"]
            lines += [f"| {a['prompt']} | {_cell(a['reference'])} | {_cell(a['quantized'])} |" for a in t["answers"]]
    published = [(n, e["publish"]) for n, e in metrics["recipes"].items() if e.get("publish", {}).get("location")]
    if published:
        lines += ["", "## Published", ""] + [f"- {n}: {p['location']}" for n, p in published]
    lines += ["", "Steps marked not_run did not run; they carry no numbers.",
              "Each recipe's plan (which Linear layers were quantized, skipped or left in high precision) "
              "is in `<recipe>/plan.json`.", ""]
    return "\n".join(lines)
