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
        if quant_method_of(path) != self.quant_method:
            return super().load(path, device, dtype, **load_kwargs)
        # transformers keeps a bitsandbytes checkpoint's other weights as stored whatever dtype it is asked for, and
        # the 4-bit layers compute in the dtype saved with them: float32 (asked for where the CPU would emulate half
        # precision, docs/testing.md) is set on both here; a half dtype stays the recipe's own.
        model = super().load(path, device, "auto", **load_kwargs)
        return computing_in_float32(model) if dtype == "float32" else model

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


def computing_in_float32(model: torch.nn.Module) -> torch.nn.Module:
    """A loaded 4-bit model made to compute in float32: its 4-bit layers' compute dtype and its plain floating
    weights (an 8-bit model, or one offloaded in part, is left as loaded: LLM.int8() takes half-precision input,
    and offloaded weights come back in their stored dtype)."""
    from bitsandbytes.nn import Linear4bit

    four_bit = [module for module in model.modules() if isinstance(module, Linear4bit)]
    if not four_bit or any(param.device.type == "meta" for param in model.parameters()):
        return model
    for module in four_bit:
        module.compute_dtype = torch.float32
    for param in model.parameters():
        if type(param) is torch.nn.Parameter and param.is_floating_point():
            param.data = param.data.float()
    return model


register(BitsAndBytes())
