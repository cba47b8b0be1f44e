"""transformers' FineGrainedFP8: float8 e4m3 weights in blocks with one scale each."""
from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from quantgate.backends import Backend, PlanError, RecipeBase, register


class FineGrainedFp8Recipe(RecipeBase):
    method: Literal["fp8"]
    weight_block_size: tuple[PositiveInt, PositiveInt] = (128, 128)


class FineGrainedFp8(Backend):
    method, recipe = "fp8", FineGrainedFp8Recipe
    tags = ("fp8",)

    def needs_cuda(self, recipe) -> str | None:
        return "transformers' FineGrainedFP8 kernels run on CUDA only"

    def fallback(self, recipe: FineGrainedFp8Recipe, name: str, out_features: int, in_features: int) -> str | None:
        rows, cols = recipe.weight_block_size
        if out_features % rows or in_features % cols:
            raise PlanError("weight_block_size", f"{rows}x{cols} blocks do not divide {name} ({out_features}x"
                            f"{in_features}); allowed: block sizes that divide both dims of every quantized layer, "
                            "or skip the layer")
        return None

    def load_config(self, recipe: FineGrainedFp8Recipe, keep: list[str]):
        from transformers import FineGrainedFP8Config

        return FineGrainedFP8Config(weight_block_size=tuple(recipe.weight_block_size), modules_to_not_convert=keep)


register(FineGrainedFp8())
