"""The suite's LoRA (tests/lora.py: rank 8 on q_proj and v_proj, STEPS steps of Adam on WikiText-2's test text) made
on a checkpoint, for runs outside the suite (docs/BENCHMARKS.md, "A LoRA adapter on SmolLM2's recipes (CPU)").
Usage, from the repository root: python docs/bench/train_lora.py CHECKPOINT OUT_FOLDER"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.lora import train_lora  # noqa: E402

if __name__ == "__main__":
    train_lora(Path(sys.argv[1]), Path(sys.argv[2]), int(os.environ.get("STEPS", 8)),
               log=lambda step, loss: print(f"step {step}: loss {loss:.3f}", flush=True))
