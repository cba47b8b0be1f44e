"""HumanEval pass@1, greedy, each completion run in quantgate's sandbox (data/humaneval; lm-eval's prompt and stop
sequences): generation, which multiple-choice log-likelihoods never exercise."""
from __future__ import annotations

import gzip
import json
import time

from quantgate.evaluations import Evaluation, register
from quantgate.paths import DATA_DIR


def problems() -> list[dict]:
    with gzip.open(DATA_DIR / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


class HumanEval(Evaluation):
    name, label, metric, paired = "humaneval", "HumanEval pass@1", "pass_at_1", "correct"

    def enabled(self, settings) -> bool:
        return settings.humaneval

    def run(self, lm, tokenizer, settings, manager) -> dict:
        from lm_eval import simple_evaluate

        start = time.perf_counter()
        code = simple_evaluate(model=lm, tasks=["quantgate_humaneval"], limit=settings.humaneval_limit,
                               task_manager=manager, log_samples=True, bootstrap_iters=0, confirm_run_unsafe_code=True,
                               gen_kwargs={"max_gen_toks": settings.humaneval_max_tokens})
        passed = {s["doc"]["task_id"]: float(s["pass@1"]) for s in code["samples"]["quantgate_humaneval"]}
        return {"pass_at_1": sum(passed.values()) / len(passed), "n": len(passed), "correct": passed,
                "max_gen_toks": settings.humaneval_max_tokens, "seconds": round(time.perf_counter() - start, 1)}


register(HumanEval())
