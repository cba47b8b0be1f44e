"""Model cards and the run figure, made from a run directory's record alone (metrics.json, env.json,
config.yaml, <recipe>/plan.json): a number that is not in the record is not in the card."""
from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import yaml

from quantgate.backends import BACKENDS
from quantgate.files import write_atomic
from quantgate.formats import context_line, gb, kl_line, num, peak_memory, tower_measures
from quantgate.plan import tower_lines

NOT_MEASURED = "not measured"


def _fmt(value, spec: str, missing: str = NOT_MEASURED) -> str:
    return num(value, spec, missing)


def _gb(value) -> str:
    return gb(value, NOT_MEASURED)


def _step_note(entry: dict, step: str) -> str:
    state = entry["steps"][step]
    return f"Not measured in this run ({step}: {state['status']}" + (f", {state['reason']}" if state.get("reason") else "") + ")."


def model_name(metrics: dict) -> str:
    base = metrics["model"].get("base_model") or metrics["model"]["source"]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base.split("/")[-1].split(":")[-1]).strip("-")


def flipped(name: str, m: dict) -> str:
    f = m["flips"]
    return (f"{name} answers that changed against the reference: {f['right_to_wrong']} right → wrong, "
            f"{f['wrong_to_right']} wrong → right (agreement {f['agreement']:.3f}; McNemar p = {f['mcnemar_p']:.3g}).")


def render_card(run_dir: Path, recipe_name: str, checkpoint_path: str = "PATH_OR_REPO", forced: bool = False) -> str:
    run_dir = Path(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    env = json.loads((run_dir / "env.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    recipe = next(r for r in config["recipes"] if r["name"] == recipe_name)
    entry = metrics["recipes"][recipe_name]
    ref = metrics["reference"]
    model = metrics["model"]
    plan_path = run_dir / recipe_name / "plan.json"
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None

    front = {"base_model": model.get("base_model") or model["source"], "base_model_relation": "quantized",
             "license": model.get("license") or "other", "library_name": "transformers",
             "pipeline_tag": "text-generation",
             "tags": ["quantgate", "quantized", *BACKENDS[recipe["method"]].tags, recipe_name]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---"]
    verdict = entry.get("validate", {}).get("verdict")
    if forced and (verdict == "fail" or entry["status"] != "passed"):
        lines.append(f"**Warning: this checkpoint FAILED quantgate's checks ({entry.get('reason', verdict)}) and was "
                     "published only because publishing was forced.**")
        lines.append("")
    q = entry.get("quantize", {})
    made = (f"**Not made by quantgate**: an existing checkpoint, `{q['source']}` (revision `{q.get('revision')}`, "
            f"sha256 `{str(q.get('checkpoint_sha256'))[:16]}…`), checked by quantgate against `{front['base_model']}`"
            if q.get("given") else f"Quantized from `{front['base_model']}` and checked by quantgate")
    lines += [f"# {model_name(metrics)} — {recipe_name}", "",
              f"{recipe.get('description') or recipe['method']}. {made}, run `{metrics['run_id']}` "
              f"({metrics['started_at']}).",
              "", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```", ""]
    if q.get("given"):
        lines += [f"Its own quantization config (`config.json`): `{json.dumps(q.get('quantization_config'))}`", ""]
    if "quantized_modules" in q:
        lines.append(f"{q['quantized_modules']} Linear layers quantized, {q['skipped_modules']} skipped, "
                     f"{q['fallback_modules']} left in high precision by the library; weights take "
                     f"{_gb(q['real_bytes'])} against the reference's {_gb(ref.get('real_bytes'))}.")
        if plan:
            groups = Counter((e["status"], re.sub(r"\.\d+\.", ".*.", e["module"]), e.get("reason", ""))
                             for e in plan["modules"] if e["status"] != "quantized")
            lines += [""] + [f"- {status}: `{module}`" + (f" (x{n})" if n > 1 else "") + f" — {reason}"
                             for (status, module, reason), n in groups.items()]
    else:
        lines.append(_step_note(entry, "quantize"))

    lines += ["", "## Validation", ""]
    v = entry.get("validate", {})
    if "verdict" in v:
        lines += ["| verdict | KL mean | KL p99 | top-1 agreement | top-5 overlap | first non-finite module |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {v['verdict']} | {_fmt(v.get('kl_mean'), '.4f')} | {_fmt(v.get('kl_p99'), '.3f')} | "
                  f"{_fmt(v.get('top1_agreement'), '.3f')} | {_fmt(v.get('top5_overlap'), '.3f')} | "
                  f"{v.get('first_nonfinite_module') or 'none'} |",
                  "", "KL is per token, KL(reference ‖ quantized) in nats, over quantgate's 20-prompt set."]
    else:
        lines.append(_step_note(entry, "validate"))
    if v.get("towers") or q.get("towers"):
        lines += ["", "## Vision and audio", ""] + [f"- {line}" for line in tower_lines(q.get("towers", {}))]
        for tower, t in v.get("towers", {}).items():
            lines.append(f"- {tower}: {t['verdict']} on {t['prompts']} {t['kind']} prompts; "
                         + tower_measures(t, "embedding cosine to the reference's") + ".")

    lines += ["", "## Evaluation", ""]
    e = entry.get("evaluate", {})
    if "mmlu" in e and "acc" in ref.get("evaluate", {}).get("mmlu", {}):
        m, rm = e["mmlu"], ref["evaluate"]["mmlu"]
        low, high = m["delta_ci95"]
        wiki, rwiki = e.get("wikitext", {}), ref["evaluate"].get("wikitext", {})
        lines += [f"MMLU through lm-eval, {config['steps']['evaluate']['num_fewshot']}-shot, {m['n']} questions "
                  f"({'all' if config['steps']['evaluate']['limit'] is None else str(config['steps']['evaluate']['limit']) + ' per subject'}); "
                  "the interval is a paired bootstrap over the same questions; normalized degradation is "
                  "(reference − quantized) / reference.", "",
                  "| model | MMLU | delta [95% CI] | significant | normalized degradation | WikiText-2 word perplexity |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| reference | {rm['acc']:.4f} | | | | {_fmt(rwiki.get('word_perplexity'), '.3f')} |",
                  f"| {recipe_name} | {m['acc']:.4f} | {m['delta_acc']:+.4f} [{low:+.4f}, {high:+.4f}] | "
                  f"{'yes' if m['significant'] else 'no'} | {_fmt(m.get('normalized_degradation'), '.2%')} | "
                  f"{_fmt(wiki.get('word_perplexity'), '.3f')} |"]
        lines += ["", flipped("MMLU", m)]
        if "humaneval" in e and "humaneval" in ref["evaluate"]:
            h, rh = e["humaneval"], ref["evaluate"]["humaneval"]
            lo, hi = h["delta_ci95"]
            lines += ["", f"HumanEval pass@1, greedy, {h['n']} problems, each completion run in a sandbox: reference "
                          f"{rh['pass_at_1']:.4f}, {recipe_name} {h['pass_at_1']:.4f}, delta {h['delta_acc']:+.4f} "
                          f"[{lo:+.4f}, {hi:+.4f}] (significant: {'yes' if h['significant'] else 'no'}).", "",
                      flipped("HumanEval", h)]
    else:
        lines.append(_step_note(entry, "evaluate"))

    lines += ["", "## Memory and latency", ""]
    b, rb = entry.get("benchmark", {}), ref.get("benchmark", {})
    if "latency" in b and "latency" in rb:
        run0 = b["latency"]["runs"][0]
        lines += [f"Batch {run0['batch_size']}, {run0['prompt_tokens']} prompt tokens, {run0['new_tokens']} new, "
                  f"median of {len(run0['decode_ms_all'])}; decode path: {b['latency']['path']}.", "",
                  "| model | peak memory | reduction | decode ms/token | speedup | prefill ms | tokens/s |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, bench in (("reference", rb), (recipe_name, b)):
            memory, latency = bench["memory"], bench["latency"]
            peak = peak_memory(bench)
            kind = "GPU" if memory.get("gpu_peak_infer") else "host private"
            reduction = memory.get("peak_reduction_vs_reference")
            lines.append(f"| {name} | {_gb(peak)} ({kind}) | {_fmt(reduction, '.1%', '–')} | "
                         f"{latency['decode_ms_per_token']:.2f} | {_fmt(latency.get('speedup_vs_reference'), '.2f', '1.00')}x | "
                         f"{latency['prefill_ms']:.1f} | {latency['tokens_per_s']:.1f} |")
        if "kv_cache" in b:
            lines += [""] + [f"- {name}: {line}" for name, bench in (("reference", rb), (recipe_name, b))
                             for line in (context_line(bench.get("kv_cache", {})), kl_line(bench.get("kv_cache", {})))
                             if line]
    else:
        lines.append(_step_note(entry, "benchmark"))

    device = env.get("device", {})
    lines += ["", "## Environment", "",
              ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "transformers", "accelerate", "lm_eval",
                                                  *BACKENDS[recipe["method"]].packages) if env.get(k))
              + f"; device: {device.get('name')}" + (f" (CUDA {device['cuda']}, driver {device.get('driver')})"
                                                   if device.get("cuda") else "")
              + f"; host: {env['host']['cpu_cores']} cores.", "",
              "## How to load", "", "```python", BACKENDS[recipe["method"]].snippet(checkpoint_path), "```", "",
              "## How to reproduce", "", "```bash",
              f"quantgate run {metrics.get('config_path', 'CONFIG')} --set 'recipes=[{recipe_name}]'", "```",
              "", f"The run's record (`metrics.json`) holds every number above; run id `{metrics['run_id']}`.", ""]
    return "\n".join(lines)


def plot_run(metrics: dict, path: Path) -> Path | None:
    """Each recipe's MMLU delta (95% CI) against its memory and its decode speedup; the reference at
    zero. None when no recipe has both an evaluation and a benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.suptitle(f"{metrics['model']['source']} — run {metrics['run_id']}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, png.getvalue())
