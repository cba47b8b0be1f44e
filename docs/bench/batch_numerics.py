"""How far the batch moves a model's next-token distribution: the long checks' chat prompts' last-token distributions
alone, left-padded into one batch, and each prompt repeated as a batch of four (no padding), as KL against alone and
the argmax of each (docs/validation.md, `long_generation_batch`). One JSON line per prompt.
Usage: python docs/bench/batch_numerics.py CHECKPOINT [DTYPE] [DEVICE]"""
import json
import sys

import torch
from transformers import AutoTokenizer

from quantgate import modeling
from quantgate.drift import encode, load_prompts
from quantgate.settings import ValidateSettings


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    p, q = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
    return round(float((p.exp() * (p - q)).sum()), 5)


@torch.no_grad()
def main(checkpoint: str, dtype: str = "bfloat16", device: str = "cpu") -> None:
    model, tokenizer = modeling.load(checkpoint, dtype, device), AutoTokenizer.from_pretrained(checkpoint)
    on, settings = modeling.model_device(model), ValidateSettings()
    prompts = [encode(tokenizer, p).to(on) for p in load_prompts(settings) if p["chat"]][:settings.long_generations]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, device=on)
    mask = torch.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - prompt.shape[1]:], mask[i, width - prompt.shape[1]:] = prompt[0], 1
    padded = model(input_ids=ids, attention_mask=mask).logits[:, -1]
    for i, prompt in enumerate(prompts):
        alone = model(input_ids=prompt).logits[0, -1]
        repeated = model(input_ids=prompt.repeat(4, 1)).logits[0, -1]
        print(json.dumps({"prompt": i, "dtype": dtype, "kl_padded_batch": kl(alone, padded[i]),
                          "kl_repeated_batch": kl(alone, repeated),
                          "argmax": [int(alone.argmax()), int(padded[i].argmax()), int(repeated.argmax())]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
