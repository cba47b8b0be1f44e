"""How far validate's KL moves when nothing is quantized: the reference measured in float32 with one thread, then the
same checkpoint compared with it computed with two threads, in bfloat16, and with the prompts padded into one batch;
a recipe's checkpoint beside them for scale (docs/validation.md, "The KL's own floor").
Usage: python docs/bench/kl_floor.py CHECKPOINT [RECIPE_NAME RECIPE_CHECKPOINT ...]"""
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from quantgate import drift, modeling
from quantgate.config import load_config
from quantgate.loading import load_saved
from quantgate.paths import DEFAULT_CONFIG
from quantgate.settings import ValidateSettings

SETTINGS = ValidateSettings(generate_prompts=0, long_context=None)


def figures(label: str, model, stats: dict, tokenizer, seconds: float | None = None) -> None:
    got = drift.compare(model, tokenizer, stats, SETTINGS)
    print(json.dumps({"compared": label, "computed": modeling.computed_dtype(model), "threads": torch.get_num_threads(),
                      "kl_mean": got["kl_mean"], "kl_p99": got["kl_p99"], "top1_agreement": got["top1_agreement"],
                      "tokens": got["tokens"], "seconds": seconds}), flush=True)


class Batched(torch.nn.Module):
    """The model fed every prompt at once, right-padded, each prompt's logits cut back to its own length."""

    def __init__(self, model, stats: dict, pad: int):
        super().__init__()
        self.model, self.logits = model, {}
        ids = [p["ids"][0] for p in stats["prompts"]]
        batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)
        with torch.no_grad():
            out = model(input_ids=batch, attention_mask=mask, output_hidden_states=True)
        for row, i in enumerate(ids):
            self.logits[tuple(i.tolist())] = (out.logits[row:row + 1, :len(i)],
                                              tuple(h[row:row + 1, :len(i)] for h in out.hidden_states))

    def forward(self, input_ids, output_hidden_states=False, **_):
        logits, hidden = self.logits[tuple(input_ids[0].tolist())]
        return type("Out", (), {"logits": logits, "hidden_states": hidden})()


def main(checkpoint: str, recipes: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.set_num_threads(1)
    reference = modeling.load(checkpoint, "float32", "cpu")
    t0 = time.perf_counter()
    stats = drift.measure_reference(reference, tokenizer, SETTINGS)
    print(json.dumps({"reference": checkpoint, "computed": "float32", "threads": 1,
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    figures("itself, one thread", reference, stats, tokenizer)
    torch.set_num_threads(2)
    figures("itself, two threads", reference, stats, tokenizer)
    figures("its prompts in one padded batch", Batched(reference, stats, tokenizer.pad_token_id or 0), stats, tokenizer)
    del reference
    t0 = time.perf_counter()
    figures("bfloat16", modeling.load(checkpoint, "bfloat16", "cpu"), stats, tokenizer, round(time.perf_counter() - t0, 1))
    config = load_config(DEFAULT_CONFIG)
    for name, folder in zip(recipes[::2], recipes[1::2]):
        recipe = next(r for r in config.recipes if r.name == name)
        figures(name, load_saved(Path(folder), recipe, "cpu", "float32"), stats, tokenizer)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
