"""Why did Gemma 3 270M's WikiText-2 word perplexity come out 6.9e10 on the H100 (CPU, first
article: 50.56)? Scores the first N documents through lm-eval (the evaluate step's own task) with
batch size 1 and with a larger batch, so padding is the only difference, at the evaluate step's
max_length (2048) and, with MAX_LENGTH=0, at the model's own (32768).
  python docs/bench/gemma_perplexity_probe.py CHECKPOINT N BATCH [DEVICE]"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from quantgate import modeling  # noqa: E402
from quantgate.evaluations.lmeval import TASKS_DIR  # noqa: E402

checkpoint, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
device = sys.argv[4] if len(sys.argv) > 4 else "cpu"
from transformers import AutoTokenizer  # noqa: E402

model = modeling.load(checkpoint, "bfloat16", device)
tokenizer = AutoTokenizer.from_pretrained(checkpoint)
manager = TaskManager(include_path=str(TASKS_DIR))
for batch_size in (1, batch):
    t0 = time.time()
    max_length = int(os.environ.get("MAX_LENGTH", 2048)) or None
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=max_length)
    r = simple_evaluate(model=lm, tasks=["quantgate_wikitext"], limit=n, task_manager=manager, bootstrap_iters=0)
    print(json.dumps({"batch_size": batch_size, "documents": n, "max_length": lm.max_length,
                      "attn": model.config._attn_implementation,
                      "word_perplexity": r["results"]["quantgate_wikitext"]["word_perplexity,none"],
                      "s": round(time.time() - t0, 1)}), flush=True)
