"""A LoRA of rank 8 on a checkpoint's q_proj and v_proj, trained STEPS steps of Adam on WikiText-2's test text (4 x
128 tokens a step), saved by peft: the adapter the suite's session flow serves (tests/conftest.py's smol_lora), for
runs outside the suite (docs/validation.md, "Adapters served on the quantized base").
Usage: python docs/bench/train_lora.py CHECKPOINT OUT_FOLDER"""
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantgate.paths import DATA_DIR


def main(checkpoint: str, out: str, steps: int) -> None:
    torch.manual_seed(0)
    text = (DATA_DIR / "wikitext2" / "test.txt").read_text()[:100_000]
    ids = AutoTokenizer.from_pretrained(checkpoint)(text, return_tensors="pt")["input_ids"][0]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(steps):
        batch = ids[step * 512:(step + 1) * 512].view(4, 128)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step + 1}: loss {loss.item():.3f}", flush=True)
    model.save_pretrained(out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(os.environ.get("STEPS", 8)))
