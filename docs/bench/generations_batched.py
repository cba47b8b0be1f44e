"""What batching validate's long generations saves: the long-checks' chat prompts generated greedily in one batch
(steps.validate.long_generation_batch: 4) or one at a time (the default), in this process, on a checkpoint; one JSON
line with the seconds and each generation's tokens, so fresh processes can be compared (docs/validation.md).
Usage: python docs/bench/generations_batched.py CHECKPOINT together|alone [DTYPE] [DEVICE]"""
import json
import sys
import time

import torch
from transformers import AutoTokenizer

from quantgate import longrange, modeling
from quantgate.drift import encode, load_prompts
from quantgate.settings import ValidateSettings


def main(checkpoint: str, how: str, dtype: str = "bfloat16", device: str = "cpu") -> None:
    settings = ValidateSettings()
    model, tokenizer = modeling.load(checkpoint, dtype, device), AutoTokenizer.from_pretrained(checkpoint)
    on = modeling.model_device(model)
    prompts = [encode(tokenizer, p).to(on) for p in load_prompts(settings) if p["chat"]][:settings.long_generations]
    t0 = time.perf_counter()
    made = longrange.generated(model, tokenizer, prompts, settings.long_new_tokens,
                               batch=len(prompts) if how == "together" else 1)
    seconds = time.perf_counter() - t0
    print(json.dumps({"how": how, "seconds": round(seconds, 2), "prompts": len(prompts),
                      "new_tokens": settings.long_new_tokens, "threads": torch.get_num_threads(),
                      "repetition": [m["degeneration"]["repetition"] for m in made],
                      "tokens": [m["ids"][0, -settings.long_new_tokens:].tolist() for m in made]}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
