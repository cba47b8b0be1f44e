"""llm-compressor: GPTQ calibrated on text, saved as compressed-tensors (the format vLLM serves).

llmcompressor 0.14.0.1 pins transformers<=5.17.0 and compressed-tensors==0.19.0; it runs on the
pinned transformers 5.23 and is installed without its pins (Makefile). Calibration text: Python's
own language reference (`pydoc_data.topics`, PSF license, shipped with every Python), which is
neither the evaluation data (MMLU, WikiText-2) nor the validation prompts.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveInt

from quantgate.backends import SHARD_SIZE, Backend, PlanError, RecipeBase, register


class GptqRecipe(RecipeBase):
    method: Literal["llmcompressor-gptq"]
    bits: Literal[4, 8] = 4
    group_size: PositiveInt = 64
    symmetric: bool = True
    calibration_samples: PositiveInt = 32
    calibration_tokens: PositiveInt = 256  # tokens per sample
    dampening: float = 0.01


class LlmCompressorGptq(Backend):
    method, recipe = "llmcompressor-gptq", GptqRecipe
    quant_method = "compressed-tensors"
    packages, tags = ("llmcompressor", "compressed-tensors"), ("llmcompressor", "compressed-tensors", "gptq")
    imports = ("compressed_tensors",)

    def stored_bits(self, recipe: GptqRecipe) -> float:
        # A bf16 scale per group, and a zero point packed as the weights are where asymmetric.
        return recipe.bits + (16 if recipe.symmetric else 16 + recipe.bits) / recipe.group_size

    def fallback(self, recipe: GptqRecipe, name: str, out_features: int, in_features: int) -> str | None:
        if in_features % recipe.group_size:
            raise PlanError("group_size", f"groups of {recipe.group_size} do not divide {name}'s {in_features} "
                            "inputs; allowed: a group size that divides every quantized layer's inputs, or skip it")
        return None

    def after_load(self, model, recipe: GptqRecipe, keep: list[str], tokenizer):
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        weights = {"num_bits": recipe.bits, "type": "int", "symmetric": recipe.symmetric, "strategy": "group",
                   "group_size": recipe.group_size}
        modifier = GPTQModifier(config_groups={"weights": {"targets": ["Linear"], "weights": weights}},
                                ignore=keep, dampening_frac=recipe.dampening)
        oneshot(model=model, dataset=calibration_set(tokenizer, recipe), recipe=modifier,
                max_seq_length=recipe.calibration_tokens, num_calibration_samples=recipe.calibration_samples)
        return model

    def save(self, model, recipe, path) -> None:
        model.save_pretrained(path, save_compressed=True, max_shard_size=SHARD_SIZE)

    def latency_caveat(self, recipe) -> str | None:
        return ("transformers runs compressed-tensors int4 by decompressing the weights to bf16 on the first "
                "forward (no int4 kernel); vLLM serves the checkpoint with int4 kernels")

    def is_quantized(self, module: torch.nn.Module) -> bool:
        # compressed-tensors keeps nn.Linear and marks the module with its scheme.
        return getattr(module, "quantization_scheme", None) is not None or super().is_quantized(module)


def calibration_set(tokenizer, recipe: GptqRecipe):
    """`calibration_samples` consecutive windows of `calibration_tokens` tokens of the calibration text."""
    from datasets import Dataset
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[k] for k in sorted(topics)))["input_ids"]
    n, length = recipe.calibration_samples, recipe.calibration_tokens
    if len(ids) < n * length:
        raise ValueError(f"recipe {recipe.name}: the calibration text has {len(ids)} tokens, fewer than "
                         f"calibration_samples x calibration_tokens = {n * length}")
    return Dataset.from_list([{"input_ids": ids[i * length:(i + 1) * length], "attention_mask": [1] * length}
                              for i in range(n)])


register(LlmCompressorGptq())
