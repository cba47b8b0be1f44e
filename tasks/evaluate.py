"""Evaluate step: MMLU (57 subjects) and WikiText-2 word perplexity through lm-eval, on the model
already loaded (lm-eval's HFLM wraps it), and the accuracy delta to the reference with a 95%
interval from a paired bootstrap over the same questions.

MMLU comes from the Hub dataset cais/mmlu (lm-eval's own `mmlu` group) or, offline, from the copy
in data/mmlu through task YAMLs written here with the same prompts (`quantgate_mmlu`): a group
with weight_by_size, so the overall score is lm-eval's own aggregation either way.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import time
from pathlib import Path

import torch
from prefect import task

from quantgate import modeling
from quantgate.backends import parse_recipe
from quantgate.config import DATA_DIR, EvaluateSettings
from quantgate.files import write_json

log = logging.getLogger("quantgate.evaluate")

TASK_UTILS = '''"""Written by quantgate (tasks/evaluate.py): the MMLU prompt, HumanEval's scoring, and lm-eval's
own WikiText-2 document functions."""
from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401


def mmlu_prompt(doc):
    # lm-eval's mmlu/default doc_to_text, as Python: its Jinja string is compiled again for every
    # question (about 30 s of a full run).
    a, b, c, d = doc["choices"]
    return f"{doc['question'].strip()}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:"


def humaneval_result(doc, results):
    # The prompt, the model's greedy completion and the problem's tests, run in quantgate's sandbox.
    from quantgate.sandbox import passes

    program = doc["prompt"] + results[0] + "\\n\\n" + doc["test"] + f"\\ncheck({doc['entry_point']})\\n"
    return {"pass@1": float(passes(program))}
'''

# lm-eval's humaneval task (greedy pass@1, its stop sequences) over data/humaneval, scored by
# humaneval_result above instead of the `evaluate` library's code_eval (fetched from the Hub).
HUMANEVAL = {
    "task": "quantgate_humaneval", "dataset_path": "json", "unsafe_code": True, "output_type": "generate_until",
    "test_split": "test", "doc_to_text": "{{prompt}}", "doc_to_target": "{{test}}",
    "process_results": "!function quantgate_utils.humaneval_result",
    "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
    "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": 1024,
                          "do_sample": False},
    "num_fewshot": 0, "metadata": {"version": 1.0},
}

# lm-eval's mmlu/default template, so local and Hub runs prompt identically (the prompt is
# mmlu_prompt above; tests/test_evaluate.py checks it against lm-eval's Jinja string).
MMLU_TEMPLATE = {
    "output_type": "multiple_choice", "test_split": "test", "fewshot_split": "dev",
    "fewshot_config": {"sampler": "first_n"},
    "doc_to_text": "!function quantgate_utils.mmlu_prompt",
    "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}


def subjects() -> list[str]:
    with open(DATA_DIR / "mmlu" / "dev.jsonl") as f:
        return sorted({json.loads(line)["subject"] for line in f})


def split_by_subject(folder: Path) -> dict[str, dict[str, str]]:
    """data/mmlu's test and dev splits, one file per subject: each task reads only its own questions
    (a filter per subject over all 14,042 cost about 6 s a model)."""
    files: dict[str, dict[str, str]] = {}
    for split in ("test", "dev"):
        rows: dict[str, list[str]] = {}
        with open(DATA_DIR / "mmlu" / f"{split}.jsonl") as f:
            for line in f:
                rows.setdefault(json.loads(line)["subject"], []).append(line)
        for subject, lines in rows.items():
            path = folder / "mmlu" / f"{subject}.{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(lines))
            files.setdefault(subject, {})[split] = str(path)
    return files


@functools.cache
def wikitext_documents() -> tuple[str, ...]:
    """The test split cut into its articles (the `page` documents lm-eval's task reads)."""
    docs, current = [], []
    for line in (DATA_DIR / "wikitext2" / "test.txt").read_text().split("\n"):
        if re.match(r"^ = [^=].* = $", line) and current:
            docs.append("\n".join(current) + "\n")
            current = []
        if line.strip() or current:
            current.append(line)
    docs.append("\n".join(current) + "\n")
    return tuple(docs)


@functools.cache  # the files depend only on the project's data: written once a process, not per recipe
def write_task_dir(root: Path) -> Path:
    """lm-eval task YAMLs over the project's data files; pass the folder as include_path."""
    import yaml

    folder = root / "lm_eval_tasks"
    folder.mkdir(parents=True, exist_ok=True)
    names = subjects()
    (folder / "quantgate_utils.py").write_text(TASK_UTILS)
    files = split_by_subject(folder)
    for name in names:
        spec = {"task": f"quantgate_mmlu_{name}", "task_alias": name, "dataset_path": "json",
                "dataset_kwargs": {"data_files": files[name]}, **MMLU_TEMPLATE,
                "description": f"The following are multiple choice questions (with answers) about "
                               f"{name.replace('_', ' ')}.\n\n"}
        (folder / f"quantgate_mmlu_{name}.yaml").write_text(_yaml(spec))
    (folder / "quantgate_mmlu.yaml").write_text(yaml.safe_dump({
        "group": "quantgate_mmlu", "task": [f"quantgate_mmlu_{n}" for n in names],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}))
    humaneval = {**HUMANEVAL,
                 "dataset_kwargs": {"data_files": {"test": str(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz")}}}
    (folder / "quantgate_humaneval.yaml").write_text(_yaml(humaneval))
    docs = folder / "wikitext2_test_documents.jsonl"
    docs.write_text("".join(json.dumps({"page": d}) + "\n" for d in wikitext_documents()))
    (folder / "quantgate_wikitext.yaml").write_text(_yaml({
        "task": "quantgate_wikitext", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(docs)}},
        "output_type": "loglikelihood_rolling", "test_split": "test", "doc_to_text": "",
        "doc_to_target": "!function quantgate_utils.wikitext_detokenizer",
        "process_results": "!function quantgate_utils.process_results",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
        "metadata": {"version": 2.0}}))
    return folder


def _yaml(spec: dict) -> str:
    import yaml

    # `!function` must stay an unquoted tag for lm-eval's loader.
    return re.sub(r"'(!function [^']+)'", r"\1", yaml.safe_dump(spec, sort_keys=False, width=1000))


def wikitext_limit(tokenizer, budget: int | None) -> int | None:
    """How many leading documents fit in a token budget (at least one); None: all of them."""
    if budget is None:
        return None
    total = 0
    for count, doc in enumerate(wikitext_documents()):
        total += len(tokenizer(doc)["input_ids"])
        if total > budget:
            return max(count, 1)
    return None


# ---------------------------------------------------------------- running lm-eval

@functools.cache
def task_manager(task_dir: Path, with_lm_evals_own: bool = False):
    """lm-eval's index of our task folder, once a process; lm-eval's own thousands of task files are
    indexed only for the Hub's mmlu (5 s a model on a 2-core CPU)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(task_dir), include_defaults=with_lm_evals_own)


def run_lm_eval(model, tokenizer, settings: EvaluateSettings, task_dir: Path) -> dict:
    """MMLU and WikiText-2 on a loaded model; per-subject results and per-question correctness."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    device = str(next(model.parameters()).device)
    # lm-eval's "auto" probes batch sizes with full-length forwards: minutes on a CPU, so 8 there.
    auto = str(settings.batch_size).startswith("auto")
    batch_size = 8 if auto and device == "cpu" else settings.batch_size
    own = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or settings.max_length
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
              max_length=min(settings.max_length, own))
    manager = task_manager(task_dir, with_lm_evals_own=settings.mmlu_source == "hub")
    group = "mmlu" if settings.mmlu_source == "hub" else "quantgate_mmlu"
    start = time.perf_counter()
    mmlu = simple_evaluate(model=lm, tasks=[group], num_fewshot=settings.num_fewshot, limit=settings.limit,
                           task_manager=manager, log_samples=True, bootstrap_iters=100)  # acc's stderr is analytic
    out = {"mmlu": {**_mmlu_results(mmlu, group), "seconds": round(time.perf_counter() - start, 1)}}
    if settings.humaneval:
        start = time.perf_counter()
        code = simple_evaluate(model=lm, tasks=["quantgate_humaneval"], limit=settings.humaneval_limit,
                               task_manager=manager, log_samples=True, bootstrap_iters=0, confirm_run_unsafe_code=True,
                               gen_kwargs={"max_gen_toks": settings.humaneval_max_tokens})
        passed = {s["doc"]["task_id"]: float(s["pass@1"]) for s in code["samples"]["quantgate_humaneval"]}
        out["humaneval"] = {"pass_at_1": sum(passed.values()) / len(passed), "n": len(passed), "correct": passed,
                            "max_gen_toks": settings.humaneval_max_tokens, "seconds": round(time.perf_counter() - start, 1)}
    if settings.wikitext:
        start = time.perf_counter()
        if auto:  # lm-eval's probe for rolling windows: five full-length forwards a try, from batch 64 down
            lm.batch_size_per_gpu = 1  # a max_length window is a forward's worth on its own
        limit = wikitext_limit(tokenizer, settings.wikitext_token_budget)
        wiki = simple_evaluate(model=lm, tasks=["quantgate_wikitext"], limit=limit, task_manager=manager,
                               bootstrap_iters=0)
        r = wiki["results"]["quantgate_wikitext"]
        out["wikitext"] = {"word_perplexity": r["word_perplexity,none"], "byte_perplexity": r["byte_perplexity,none"],
                           "bits_per_byte": r["bits_per_byte,none"],
                           "documents": wiki["n-samples"]["quantgate_wikitext"]["effective"],
                           "seconds": round(time.perf_counter() - start, 1)}
    return out


def _mmlu_results(result: dict, group: str) -> dict:
    prefix = f"{group}_"
    per_subject, correct = {}, {}
    for name, samples in result["samples"].items():
        subject = name.removeprefix(prefix)
        for sample in samples:
            correct[f"{subject}/{sample['doc_id']}"] = float(sample["acc"])
        r = result["results"][name]
        per_subject[subject] = {"acc": r["acc,none"], "n": len(samples)}
    overall = result["results"][group]
    return {"acc": overall["acc,none"], "acc_stderr": overall.get("acc_stderr,none"),
            "n": sum(s["n"] for s in per_subject.values()), "subjects": per_subject, "correct": correct}


def paired_bootstrap(reference: dict[str, float], recipe: dict[str, float], iters: int = 10000,
                     seed: int = 0) -> dict:
    """Accuracy delta (recipe - reference) over the same questions, with a 95% percentile interval.
    Significant only where McNemar's test on the flips agrees: with a handful of discordant answers all one
    way the percentile interval leaves out zero although so few flips are chance (p 0.125 for 4 of 4)."""
    keys = sorted(reference.keys() & recipe.keys())
    ref = torch.tensor([reference[k] for k in keys])
    rec = torch.tensor([recipe[k] for k in keys])
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(keys), (iters, len(keys)), generator=generator)
    deltas = (rec[idx] - ref[idx]).mean(1)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975])).tolist()
    agreement = flips(ref, rec)
    return {"delta_acc": float((rec - ref).mean()), "delta_ci95": [low, high], "paired_n": len(keys),
            "significant": not (low <= 0 <= high) and agreement["flips"]["mcnemar_p"] < 0.05, **agreement}


def flips(ref: torch.Tensor, rec: torch.Tensor) -> dict:
    """Per-question agreement: answers that flipped each way, and McNemar's exact two-sided p-value (a
    binomial test on the flips), so a recipe right as often but on other questions shows."""
    lost, gained = int(((ref == 1) & (rec == 0)).sum()), int(((ref == 0) & (rec == 1)).sum())
    n = lost + gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1)) / 2 ** n if n else 1.0
    return {"flips": {"right_to_wrong": lost, "wrong_to_right": gained, "agreement": 1 - n / len(ref) if len(ref) else None,
                      "mcnemar_p": min(1.0, 2 * tail)}}


# ---------------------------------------------------------------- the step

def eval_key(checkpoint_sha256: str, dtype: str, settings: EvaluateSettings) -> str:
    data = hashlib.sha256((DATA_DIR / "mmlu" / "test.jsonl").read_bytes()
                          + (DATA_DIR / "humaneval" / "HumanEval.jsonl.gz").read_bytes()).hexdigest()
    spec = json.dumps([checkpoint_sha256, dtype, data, settings.model_dump(exclude={"timeout_s", "retries"})])
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


def cached_results(path: Path) -> dict | None:
    """A cached reference evaluation, or None (with a warning: it is measured again) where it is not one."""
    try:
        results = json.loads(path.read_text())
        if isinstance(results, dict) and isinstance(results.get("mmlu", {}).get("correct"), dict):
            return results
        problem = "no per-question results"
    except ValueError as e:
        problem = f"not JSON: {e}"
    log.warning("cached reference evaluation %s is unusable (%s): measuring it again", path, problem)
    return None


def reference_evaluation(model, tokenizer, checkpoint_sha256: str, dtype: str, cache_dir: Path,
                         settings: EvaluateSettings) -> dict:
    """The reference's evaluation, from the cache when the same checkpoint and settings ran before."""
    path = Path(cache_dir) / "reference" / eval_key(checkpoint_sha256, dtype, settings) / "evaluate.json"
    results = cached_results(path) if path.is_file() else None
    cached = results is not None
    if not cached:
        with modeling.timed("evaluate reference"):
            results = run_lm_eval(model, tokenizer, settings, write_task_dir(Path(cache_dir)))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
    return {"path": str(path), "cached": cached, **_summary(results)}


def _summary(results: dict) -> dict:
    """The record's view: everything but the per-question correctness."""
    out = {name: {k: v for k, v in results[name].items() if k != "correct"}
           for name in ("mmlu", "humaneval") if name in results}
    if "wikitext" in results:
        out["wikitext"] = results["wikitext"]
    return out


def evaluate(checkpoint: str, recipe: dict, reference: dict, device: str, settings: dict, cache_dir: str,
             out_dir: str, compute_dtype: str = "auto") -> dict:
    from tasks.quantize import kernel_of, load_saved
    from transformers import AutoTokenizer

    recipe = parse_recipe(recipe)
    settings = EvaluateSettings.model_validate(settings)
    t0 = time.perf_counter()
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    load_s = round(time.perf_counter() - t0, 2)
    with modeling.timed(f"evaluate {recipe.name}"):
        results = run_lm_eval(model, AutoTokenizer.from_pretrained(checkpoint), settings,
                              write_task_dir(Path(cache_dir)))
    write_json(Path(out_dir) / "evaluate.json", results)  # per question, for later comparisons
    ref = json.loads(Path(reference["path"]).read_text())
    summary = _summary(results)
    mmlu = summary["mmlu"]
    mmlu.update(paired_bootstrap(ref["mmlu"]["correct"], results["mmlu"]["correct"], settings.bootstrap_iters))
    # torchao's cards: how much of the reference's accuracy is lost, relative to it.
    mmlu["normalized_degradation"] = (ref["mmlu"]["acc"] - mmlu["acc"]) / ref["mmlu"]["acc"] if ref["mmlu"]["acc"] else None
    if "humaneval" in summary and "humaneval" in ref:  # pass@1 per problem: the same paired comparison
        summary["humaneval"].update(paired_bootstrap(ref["humaneval"]["correct"], results["humaneval"]["correct"],
                                                     settings.bootstrap_iters))
    if "wikitext" in summary and "wikitext" in ref:
        summary["wikitext"]["delta_word_perplexity"] = (summary["wikitext"]["word_perplexity"]
                                                        - ref["wikitext"]["word_perplexity"])
    return {"status": "ok", **summary, "compute_dtype": modeling.computed_dtype(model), "load_s": load_s,
            **kernel_of(recipe)}


evaluate_task = task(evaluate, name="evaluate", task_run_name="evaluate-{recipe[name]}")
