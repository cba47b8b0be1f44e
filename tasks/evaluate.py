"""Evaluate step: the registered evaluations (quantgate.evaluations: MMLU, WikiText-2 perplexity, HumanEval) on a
recipe's saved checkpoint through lm-eval, each compared with the reference's: a paired bootstrap over the same
items where the evaluation scores them one by one."""
from __future__ import annotations

import json
import time
from pathlib import Path

from quantgate import modeling
from quantgate.backends import RecipeBase
from quantgate.evaluations import lmeval, stats
from quantgate.files import write_json
from quantgate.loading import kernel_of, load_saved
from quantgate.results import Evaluated, ReferenceEvaluation
from quantgate.settings import EvaluateSettings


def evaluate(checkpoint: str, recipe: RecipeBase, reference: ReferenceEvaluation, device: str | dict,
             settings: EvaluateSettings, out_dir: str, compute_dtype: str = "auto") -> Evaluated:
    """Every enabled evaluation on the checkpoint; per-item results go to `out_dir`/evaluate.json."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    load_s = round(time.perf_counter() - t0, 2)
    with modeling.timed(f"evaluate {recipe.name}"):
        results = lmeval.run_all(model, AutoTokenizer.from_pretrained(checkpoint), settings)
    write_json(Path(out_dir) / "evaluate.json", results)  # per item, for later comparisons
    ref = json.loads(Path(reference.path).read_text())
    scored = lmeval.compared(results, ref, settings)
    return Evaluated(status="ok", **scored, joint=stats.joint(scored), compute_dtype=modeling.computed_dtype(model),
                     load_s=load_s, **kernel_of(recipe))
