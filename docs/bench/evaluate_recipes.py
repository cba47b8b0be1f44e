"""The evaluate step with more questions than a run's quick setting (docs/BENCHMARKS.md): the reference of a
finished run and its recipes' saved checkpoints, MMLU with LIMIT questions a subject and HUMANEVAL problems,
each recipe paired with the reference (delta, 95% interval, flips).
Usage: LIMIT=10 HUMANEVAL=164 python docs/bench/evaluate_recipes.py RUN_DIR RECIPE...
"""
import json
import os
import sys
import time
from pathlib import Path

import yaml
from transformers import AutoTokenizer

from quantgate import modeling
from quantgate.config import RunConfig
from quantgate.evaluations.lmeval import reference_evaluation
from quantgate.results import ReferenceEvaluation
from quantgate.settings import EvaluateSettings
from tasks.evaluate import evaluate

run = Path(sys.argv[1])
config = RunConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
metrics = json.loads((run / "metrics.json").read_text())
settings = EvaluateSettings(limit=int(os.environ.get("LIMIT", 10)), humaneval=True, wikitext=False,
                            humaneval_limit=int(os.environ.get("HUMANEVAL", 164)))
checkpoint = metrics["model"]["checkpoint"]
cache = Path(".cache/quantgate-bench")
t0 = time.time()
model = modeling.load(checkpoint, modeling.compute_dtype(config.model.dtype, "cpu"), "cpu")
reference = reference_evaluation(model, AutoTokenizer.from_pretrained(checkpoint), metrics["model"]["checkpoint_sha256"],
                                 config.model.dtype, cache, settings)
del model


def scores(e: dict) -> dict:
    return {name: {k: v for k, v in e[name].items() if k not in ("subjects", "correct")} for name in ("mmlu", "humaneval")}


print(json.dumps({"model": "reference", "seconds": round(time.time() - t0, 1), **scores(reference)}), flush=True)
recipes = {r.name: r for r in config.recipes}
for name in sys.argv[2:]:
    t0 = time.time()
    result = evaluate(str(run / name / "checkpoint"), recipes[name], ReferenceEvaluation(**reference), "cpu",
                      settings, str(cache / "recipes" / name))
    print(json.dumps({"model": name, "seconds": round(time.time() - t0, 1), **scores(result.model_dump())}), flush=True)
