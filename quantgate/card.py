"""Model cards, made from a run directory's record alone (metrics.json, env.json,
config.yaml, <recipe>/plan.json): a number that is not in the record is not in the card."""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import yaml

from quantgate import evaluations
from quantgate.backends import BACKENDS
from quantgate.formats import (ADAPTER_HEADER, adapter_benchmark_lines, adapter_evaluation_header, adapter_evaluation_rows,
                               adapter_row, code, context_line, gb, kl_line, markdown_table, num, peak_memory, text,
                               tower_measures)
from quantgate.plan import tower_lines

NOT_MEASURED = "not measured"


def _fmt(value, spec: str, missing: str = NOT_MEASURED) -> str:
    return num(value, spec, missing)


def _gb(value) -> str:
    return gb(value, NOT_MEASURED)


def _step_note(entry: dict, step: str) -> str:
    state = entry["steps"][step]
    return f"Not measured in this run ({step}: {state['status']}" + (f", {text(state['reason'])}" if state.get("reason") else "") + ")."


def model_name(metrics: dict) -> str:
    base = metrics["model"].get("base_model") or metrics["model"]["source"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base.split("/")[-1].split(":")[-1]).strip("-")


def render_card(run_dir: Path, recipe_name: str, checkpoint_path: str = "PATH_OR_REPO", forced: bool = False) -> str:
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = next(r for r in config["recipes"] if r["name"] == recipe_name)
    entry, ref = metrics["recipes"][recipe_name], metrics["reference"]
    plan_path = run_dir / recipe_name / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    lines = header_lines(metrics, recipe, entry, forced) + quantize_lines(entry, ref, plan)
    lines += validation_lines(entry) + adapter_lines(entry, ref)
    lines += evaluation_lines(entry, ref, recipe_name, config["steps"]["evaluate"])
    lines += benchmark_lines(entry, ref, recipe_name)
    lines += environment_lines(env, recipe) + [
        "## How to load", "", "```python", BACKENDS[recipe["method"]].snippet(checkpoint_path), "```", "",
        "## How to reproduce", "", "```bash",
        f"quantgate run {metrics.get('config_path', 'CONFIG')} --set 'recipes=[{recipe_name}]'", "```",
        "", f"The run's record (`metrics.json`) holds every number above; run id `{metrics['run_id']}`.", ""]
    return "\n".join(lines)


def header_lines(metrics: dict, recipe: dict, entry: dict, forced: bool) -> list[str]:
    """The Hub's front matter, a warning where publishing was forced, the title, where it came from, the recipe."""
    model, name = metrics["model"], recipe["name"]
    base = model.get("base_model") or model["source"]
    front = {"base_model": base, "base_model_relation": "quantized", "license": model.get("license") or "other",
             "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["quantgate", "quantized", *BACKENDS[recipe["method"]].tags, name]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---"]
    verdict = entry.get("validate", {}).get("verdict")
    if forced and (verdict == "fail" or entry["status"] != "passed"):
        lines += [f"**Warning: this checkpoint FAILED quantgate's checks ({text(entry.get('reason', verdict))}) and "
                  "was published only because publishing was forced.**", ""]
    q = entry.get("quantize", {})
    made = (f"**Not made by quantgate**: an existing checkpoint, {code(q['source'])} (revision "
            f"{code(q.get('revision'))}, sha256 `{str(q.get('checkpoint_sha256'))[:16]}…`), checked by quantgate "
            f"against {code(base)}" if q.get("given") else f"Quantized from {code(base)} and checked by quantgate")
    # A fence inside the recipe (a description) would end the code block early.
    recipe_yaml = yaml.safe_dump(recipe, sort_keys=False).strip().replace("```", "` ` `")
    return lines + [f"# {text(model_name(metrics))} — {name}", "",
                    f"{text(recipe.get('description') or recipe['method'])}. {made}, run `{metrics['run_id']}` "
                    f"({metrics['started_at']}).", "", "## Recipe", "", "```yaml", recipe_yaml, "```", ""]


def quantize_lines(entry: dict, ref: dict, plan: dict | None) -> list[str]:
    q, lines = entry.get("quantize", {}), []
    if q.get("given"):
        lines += [f"Its own quantization config (`config.json`): {code(json.dumps(q.get('quantization_config')))}", ""]
    if "quantized_modules" not in q:
        return lines + [_step_note(entry, "quantize")]
    lines.append(f"{q['quantized_modules']} Linear layers quantized, {q['skipped_modules']} skipped, "
                 f"{q['fallback_modules']} left in high precision by the library; weights take "
                 f"{_gb(q['real_bytes'])} against the reference's {_gb(ref.get('real_bytes'))}.")
    if plan:
        groups = Counter((e["status"], re.sub(r"\.\d+\.", ".*.", e["module"]), e.get("reason", ""))
                         for e in plan["modules"] if e["status"] != "quantized")
        lines += [""] + [f"- {status}: `{module}`" + (f" (x{n})" if n > 1 else "") + f" — {text(reason)}"
                         for (status, module, reason), n in groups.items()]
    return lines


def validation_lines(entry: dict) -> list[str]:
    lines, v, q = ["", "## Validation", ""], entry.get("validate", {}), entry.get("quantize", {})
    if "verdict" in v:
        lines += ["| verdict | KL mean | KL p99 | top-1 agreement | top-5 overlap | first non-finite module |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {v['verdict']} | {_fmt(v.get('kl_mean'), '.4f')} | {_fmt(v.get('kl_p99'), '.3f')} | "
                  f"{_fmt(v.get('top1_agreement'), '.3f')} | {_fmt(v.get('top5_overlap'), '.3f')} | "
                  f"{v.get('first_nonfinite_module') or 'none'} |",
                  "", "KL is per token, KL(reference ‖ quantized) in nats, over quantgate's 20-prompt set."]
        if long := v.get("long"):
            lines += ["", f"By position, teacher-forced on sequences of up to {long['longest']:,} tokens: "
                      + "; ".join(f"{r['from']:,}-{r['to']:,}: KL {_fmt(r['kl_mean'], '.4f')}, top-1 "
                                  f"{_fmt(r['top1_agreement'], '.3f')}" for r in long["buckets"]) + "."]
            lines += [f"Long greedy generation ({g['quantized']['tokens']} tokens) of {g['prompt']}: 4-gram repetition "
                      f"{g['quantized']['repetition']:.3f} (reference {g['reference']['repetition']:.3f})."
                      for g in long["generations"]]
        if found := v.get("stored", {}).get("findings"):
            lines += ["", "Stored tensors that fail it, read from its files before any forward:", ""]
            lines += [f"- {code(f['module'])}'s {code(f['tensor'])}: {f['count']:,} × {f['problem']}" for f in found]
    else:
        lines.append(_step_note(entry, "validate"))
    if v.get("towers") or q.get("towers"):
        lines += ["", "## Vision and audio", ""] + [f"- {line}" for line in tower_lines(q.get("towers", {}))]
        lines += [f"- {tower}: {t['verdict']} on {t['prompts']} {t['kind']} prompts; "
                  + tower_measures(t, "embedding cosine to the reference's") + "."
                  for tower, t in v.get("towers", {}).items()]
    return lines + remedy_lines(v.get("attribution"), entry.get("remedy"))


def adapter_lines(entry: dict, ref: dict) -> list[str]:
    """The LoRA adapters gated on this checkpoint, each against the unquantized model with it."""
    if not ref.get("adapters"):
        return []
    lines = ["", "## Served with adapters", ""]
    if not entry.get("adapters"):
        return lines + [_step_note(entry, "adapters") if "adapters" in entry["steps"] else
                        "Not measured in this run (the recipe stopped before its adapters were gated)."]
    return lines + ["Each adapter loaded by peft on this checkpoint, against the unquantized model with the same "
                    "adapter; its decided tokens are those whose top-1 it changes on the unquantized model.", "",
                    *markdown_table(ADAPTER_HEADER, [adapter_row(name, a) for name, a in entry["adapters"].items()]),
                    *adapter_evaluation_lines(entry),
                    *(["", "Benchmarked with each adapter on top, against this checkpoint without it:", "",
                       *[f"- {line}" for line in benched]] if (benched := adapter_benchmark_lines(entry)) else [])]


def adapter_evaluation_lines(entry: dict) -> list[str]:
    """The evaluations run with each adapter on this checkpoint, against the unquantized model with the same adapter."""
    if not (rows := adapter_evaluation_rows(entry)):
        return []
    return ["", "Evaluated with each adapter, against the unquantized model with the same adapter:", "",
            *markdown_table(adapter_evaluation_header(), rows)]


def remedy_lines(found: dict | None, remedy: dict | None) -> list[str]:
    """Which modules drift the most (the top three by KL recovered) and the variant that passes, where quantgate
    remedy ran on this recipe."""
    if not remedy:
        return []
    lines = ["", "### What would pass", ""]
    if found:
        top = sorted(found["modules"], key=lambda r: (r["kl_recovered"] is not None, -(r["kl_recovered"] or 0)))[:3]
        lines += [f"- {code(r['module'])} kept in high precision: mean KL {_fmt(r['kl_mean'], '.4f')} "
                  f"(recovers {_fmt(r['kl_recovered'], '.4f')}) for {r['bytes_added']:,} bytes" for r in top]
    chosen = (remedy.get("gated") or {}).get("chosen")
    if chosen:
        row = remedy["gated"]["tried"][chosen - 1]
        lines.append(f"- Passes when quantized and validated again: {row['change']} ({row['bytes']:,} bytes, mean KL "
                     f"{_fmt(row.get('kl_mean'), '.4f')}); the recipe: `{Path(remedy['file']).name}` in the run's folder.")
    else:
        lines.append(f"- {remedy.get('reason')}.")
    return lines


def evaluation_lines(entry: dict, ref: dict, recipe: str, settings: dict) -> list[str]:
    """Each registered evaluation's paragraph, where both the recipe and the reference have it."""
    lines, mine, theirs = ["", "## Evaluation", ""], entry.get("evaluate", {}), ref.get("evaluate", {})
    shown = [e for e in evaluations.registered() if e.metric in mine.get(e.name, {}) and e.name in theirs]
    for e in shown:
        lines += e.card_lines(mine[e.name], theirs[e.name], recipe, settings) + [""]
    if joint := mine.get("joint"):
        lines += [f"Accuracy across its paired evaluations: {joint['decision']} ({joint['method']}; adjusted p: "
                  + ", ".join(f"{name} {p:.3g}" for name, p in joint["adjusted_p"].items()) + ").", ""]
    return lines[:-1] if shown else lines + [_step_note(entry, "evaluate")]


def benchmark_lines(entry: dict, ref: dict, recipe: str) -> list[str]:
    lines, b, rb = ["", "## Memory and latency", ""], entry.get("benchmark", {}), ref.get("benchmark", {})
    if "latency" not in b or "latency" not in rb:
        return lines + [_step_note(entry, "benchmark")]
    run0 = b["latency"]["runs"][0]
    lines += [f"Batch {run0['batch_size']}, {run0['prompt_tokens']} prompt tokens, {run0['new_tokens']} new, "
              f"median of {len(run0['decode_ms_all'])}; decode path: {b['latency']['path']}.", "",
              "| model | peak memory | reduction | decode ms/token | speedup | prefill ms | tokens/s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, bench in (("reference", rb), (recipe, b)):
        memory, latency = bench["memory"], bench["latency"]
        kind = "GPU" if memory.get("gpu_peak_infer") else "host private"
        lines.append(f"| {name} | {_gb(peak_memory(bench))} ({kind}) | "
                     f"{_fmt(memory.get('peak_reduction_vs_reference'), '.1%', '–')} | "
                     f"{latency['decode_ms_per_token']:.2f} | "
                     f"{_fmt(latency.get('speedup_vs_reference'), '.2f', '1.00')}x | "
                     f"{latency['prefill_ms']:.1f} | {latency['tokens_per_s']:.1f} |")
    if "kv_cache" in b:
        lines += [""] + [f"- {name}: {line}" for name, bench in (("reference", rb), (recipe, b))
                         for line in (context_line(bench.get("kv_cache", {})), kl_line(bench.get("kv_cache", {})))
                         if line]
    return lines


def environment_lines(env: dict, recipe: dict) -> list[str]:
    device = env.get("device", {})
    cuda = f" (CUDA {device['cuda']}, driver {device.get('driver')})" if device.get("cuda") else ""
    return ["", "## Environment", "",
            ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "accelerate", "lm_eval",
                                                *BACKENDS[recipe["method"]].packages) if env.get(k))
            + f"; device: {device.get('name')}{cuda}; host: {env['host']['cpu_cores']} cores.", ""]
