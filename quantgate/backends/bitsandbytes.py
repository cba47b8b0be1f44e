"""bitsandbytes: LLM.int8() and 4-bit NF4/FP4 weights, quantized while loading."""
from __future__ import annotations

from typing import Literal

import torch

from quantgate.backends import Backend, RecipeBase, quant_method_of, register


class BitsAndBytesRecipe(RecipeBase):
    method: Literal["bitsandbytes"]
    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class BitsAndBytes(Backend):
    method, recipe = "bitsandbytes", BitsAndBytesRecipe
    quant_method = "bitsandbytes"
    packages, tags, imports = ("bitsandbytes",), ("bitsandbytes",), ("bitsandbytes",)

    def load(self, path, device: str, dtype: str = "auto", **load_kwargs) -> torch.nn.Module:
        # bitsandbytes computes in its own compute dtype and transformers keeps the rest as stored: asked for another
        # dtype, it converts a few parameters only, and a Linear kept out of the quantization gets the other dtype's input.
        quantized = quant_method_of(path) == self.quant_method
        return super().load(path, device, "auto" if quantized else dtype, **load_kwargs)

    def stored_bits(self, recipe: BitsAndBytesRecipe) -> float:
        if recipe.bits == 8:
            return 8.0  # and a float32 scale per row
        # A scale per 64 weights: float32, or 8 bits with double quantization (a float32 per 256 of those).
        return 4 + (8 / 64 + 32 / (64 * 256) if recipe.double_quant else 32 / 64)

    def load_config(self, recipe: BitsAndBytesRecipe, keep: list[str]):
        from transformers import BitsAndBytesConfig

        if recipe.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=recipe.quant_type,
                                  bnb_4bit_use_double_quant=recipe.double_quant,
                                  bnb_4bit_compute_dtype=getattr(torch, recipe.compute_dtype),
                                  llm_int8_skip_modules=keep)


register(BitsAndBytes())
