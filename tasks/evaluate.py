"""Evaluate step: the registered evaluations (quantgate.evaluations: MMLU, WikiText-2 perplexity, HumanEval) on a
recipe's saved checkpoint through lm-eval, each compared with the reference's: a paired bootstrap over the same
items where the evaluation scores them one by one. With served adapters, the same again per adapter, against the
reference with it."""
from __future__ import annotations

import json
import time
from pathlib import Path

from quantgate import adapters, modeling
from quantgate.backends import RecipeBase
from quantgate.evaluations import lmeval, stats
from quantgate.files import write_json
from quantgate.loading import kernel_of, load_saved
from quantgate.results import Evaluated, ReferenceEvaluation
from quantgate.settings import EvaluateSettings


def evaluate(checkpoint: str, recipe: RecipeBase, reference: ReferenceEvaluation, device: str | dict,
             settings: EvaluateSettings, out_dir: str, compute_dtype: str = "auto",
             adapters_served: dict | None = None) -> Evaluated:
    """Every enabled evaluation on the checkpoint; per-item results go to `out_dir`/evaluate.json. `adapters_served`:
    the reference step's adapters (those with an `evaluate`), each evaluated on this checkpoint too."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = load_saved(Path(checkpoint), recipe, modeling.resolve_device(device), compute_dtype)
    load_s = round(time.perf_counter() - t0, 2)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with modeling.timed(f"evaluate {recipe.name}"):
        scored = scored_against(lmeval.run_all(model, tokenizer, settings), reference.path, settings,
                                Path(out_dir) / "evaluate.json")
    served = {}
    for name, found in (adapters_served or {}).items():
        with modeling.timed(f"evaluate {recipe.name} with adapter {name}"):
            served[name] = with_adapter(model, tokenizer, found, settings, Path(out_dir) / f"evaluate-adapter-{name}.json")
    return Evaluated(status="ok", **scored, **({"adapters": served} if served else {}),
                     compute_dtype=modeling.computed_dtype(model), load_s=load_s, **kernel_of(recipe))


def scored_against(results: dict, reference_path: str, settings: EvaluateSettings, out: Path) -> dict:
    """The record's view of `results` against the reference's at `reference_path`, with the joint decision; the
    per-item results kept at `out` for later comparisons."""
    write_json(out, results)
    scored = lmeval.compared(results, json.loads(Path(reference_path).read_text()), settings)
    return {**scored, "joint": stats.joint(scored)}


def with_adapter(model, tokenizer, found: dict, settings: EvaluateSettings, out: Path) -> dict:
    """The checkpoint with a served adapter on top, as peft loads it, against the reference with the same adapter;
    the model is left without it."""
    with adapters.attached(model, Path(found["folder"])) as adapted:
        return scored_against(lmeval.run_all(adapted, tokenizer, settings), found["evaluate"]["path"], settings, out)
