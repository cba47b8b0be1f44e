"""A LoRA trained on shipped text: an adapter that changes what the model predicts, as a fine-tune does; the suite's
(tests/golden/lora-wiki, checked in: tests/golden/README.md) and the one docs/bench/train_lora.py makes for runs
outside the suite."""
from pathlib import Path

import torch

from quantgate.paths import DATA_DIR


def train_lora(checkpoint: Path, out: Path, steps: int = 8, log=None) -> Path:
    """A LoRA of rank 8 on q_proj and v_proj, trained `steps` steps of Adam (lr 1e-3) on WikiText-2's test text, 4 x
    128 tokens a step, saved by peft at `out`; `log`, if given, is called with each step's loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        if log:
            log(step + 1, loss.item())
    model.save_pretrained(out)
    return Path(out)
