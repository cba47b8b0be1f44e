"""Forward time of the 20 validation prompts (3,892 tokens) for the reference and saved recipe
checkpoints, loaded to compute in bf16 and in float32 (docs/BENCHMARKS.md, "The first run").
Usage: python docs/bench/compute_dtype.py CHECKPOINT [RECIPE_CHECKPOINT ...]
On a CPU with AVX512-BF16, `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2` makes torch compute as
on a CPU without it (bf16 emulated)."""
import json
import sys
import time
from collections import Counter

import torch
from transformers import AutoConfig, AutoTokenizer

from quantgate import modeling
from quantgate.backends import BACKENDS
from quantgate.drift import encode
from quantgate.prompts import read as read_prompts


def backend_for(path: str):
    quant = getattr(AutoConfig.from_pretrained(path), "quantization_config", None) or {}
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    return BACKENDS.get({"bitsandbytes": "bitsandbytes", "torchao": "torchao"}.get(str(method), ""), None)


tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
prompts = [encode(tokenizer, p) for p in read_prompts()]
for path in sys.argv[1:]:
    for dtype in ("bfloat16", "float32"):
        backend = backend_for(path)
        model = backend.load(path, "cpu", dtype) if backend else modeling.load(path, dtype, "cpu")
        t0 = time.perf_counter()
        with torch.no_grad():
            logits = [model(input_ids=ids).logits for ids in prompts]
        print(json.dumps({"checkpoint": path, "asked": dtype, "computed": modeling.computed_dtype(model),
                          "logits": str(logits[0].dtype), "seconds": round(time.perf_counter() - t0, 2),
                          "tokens": sum(p.shape[1] for p in prompts), "native_bf16": modeling.native_bf16(),
                          "dtypes": dict(Counter(str(p.dtype) for p in model.parameters()))}), flush=True)
