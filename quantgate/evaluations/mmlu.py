"""MMLU (57 subjects), 0-shot by default, through lm-eval: from the project's data/mmlu with lm-eval's own
prompt (the quantgate_mmlu group, weight_by_size) or from the Hub dataset cais/mmlu (lm-eval's `mmlu`)."""
from __future__ import annotations

import functools
import json
import time

from quantgate.evaluations import Evaluation, power_line, register
from quantgate.paths import DATA_DIR


@functools.cache
def questions(split: str) -> dict[str, list[dict]]:
    """data/mmlu's split, by subject."""
    rows: dict[str, list[dict]] = {}
    with open(DATA_DIR / "mmlu" / f"{split}.jsonl") as f:
        for line in f:
            doc = json.loads(line)
            rows.setdefault(doc["subject"], []).append(doc)
    return rows


def subjects() -> list[str]:
    return sorted(questions("dev"))


class Mmlu(Evaluation):
    name, label, metric, paired = "mmlu", "MMLU", "acc", "correct"

    def run(self, lm, tokenizer, settings, manager) -> dict:
        from lm_eval import simple_evaluate

        group = "mmlu" if settings.mmlu_source == "hub" else "quantgate_mmlu"
        tasks = [f"{group}_{s}" for s in settings.mmlu_subjects] if settings.mmlu_subjects else [group]
        start = time.perf_counter()
        result = simple_evaluate(model=lm, tasks=tasks, num_fewshot=settings.num_fewshot, limit=settings.limit,
                                 task_manager=manager, log_samples=True, bootstrap_iters=100)  # acc's stderr is analytic
        return {**self.results(result, group), "seconds": round(time.perf_counter() - start, 1)}

    @staticmethod
    def results(result: dict, group: str) -> dict:
        per_subject, correct = {}, {}
        for name, samples in result["samples"].items():
            subject = name.removeprefix(f"{group}_")
            for sample in samples:
                correct[f"{subject}/{sample['doc_id']}"] = float(sample["acc"])
            per_subject[subject] = {"acc": result["results"][name]["acc,none"], "n": len(samples)}
        n = sum(s["n"] for s in per_subject.values())
        if group in result["results"]:  # every subject: the group's figure, weighted by size
            overall = result["results"][group]
            acc, stderr = overall["acc,none"], overall.get("acc_stderr,none")
        else:  # some subjects: the same mean over their questions, and its standard error, by lm-eval's own metrics
            from lm_eval.api.metrics import mean, mean_stderr

            scores = list(correct.values())
            acc, stderr = mean(scores), mean_stderr(scores) if n > 1 else None
        return {"acc": acc, "acc_stderr": stderr, "n": n, "subjects": per_subject, "correct": correct}

    def compare(self, mine: dict, ref: dict, settings) -> dict:
        # torchao's cards: how much of the reference's accuracy is lost, relative to it.
        lost = (ref["acc"] - mine["acc"]) / ref["acc"] if ref["acc"] else None
        return {**super().compare(mine, ref, settings), "normalized_degradation": lost}

    def card_lines(self, mine: dict, ref: dict, recipe: str, settings: dict) -> list[str]:
        limit, asked = settings["limit"], settings.get("mmlu_subjects")
        low, high = mine["delta_ci95"]
        return [f"MMLU through lm-eval, {settings['num_fewshot']}-shot, {mine['n']} questions "
                f"({'all' if limit is None else f'{limit} per subject'}"
                f"{f' of {len(asked)} subjects' if asked else ''}); the interval is a paired bootstrap over the "
                "same questions; normalized degradation is (reference − quantized) / reference.", "",
                "| model | MMLU | delta [95% CI] | significant | normalized degradation |",
                "| --- | --- | --- | --- | --- |", f"| reference | {ref['acc']:.4f} | | | |",
                f"| {recipe} | {mine['acc']:.4f} | {mine['delta_acc']:+.4f} [{low:+.4f}, {high:+.4f}] | "
                f"{'yes' if mine['significant'] else 'no'} | "
                + (f"{mine['normalized_degradation']:.2%}" if mine.get("normalized_degradation") is not None
                   else "not measured") + " |", "",
                f"Power: {power_line(mine)}.", "",
                *super().card_lines(mine, ref, recipe, settings)[2:]]


register(Mmlu())
