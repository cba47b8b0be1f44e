"""torchao: int8 and int4 weights, float8 and int8 dynamic activations, quantized while loading."""
from __future__ import annotations

import importlib.util
from typing import Literal

from pydantic import PositiveInt

from quantgate.backends import Backend, RecipeBase, register

CUDA_ONLY = ("int4_weight_only", "float8_dynamic_activation")


class TorchAoRecipe(RecipeBase):
    method: Literal["torchao"]
    scheme: Literal["int8_weight_only", "int8_dynamic_activation", "int4_weight_only", "float8_dynamic_activation"]
    group_size: PositiveInt = 128
    # tile_packed_to_4d runs on torch's tinygemm kernel. plain (and torchao's default, preshuffled)
    # need the `mslk` package (PyPI: mslk-cuda, CUDA 13 builds), which is not a dependency: at
    # batch 1 on the H100 both ran slower than tinygemm (docs/BENCHMARKS.md).
    int4_packing_format: Literal["tile_packed_to_4d", "plain"] = "tile_packed_to_4d"
    int4_qparams: Literal["hqq", "tinygemm"] = "hqq"


class TorchAo(Backend):
    method, recipe = "torchao", TorchAoRecipe
    quant_method = "torchao"
    packages, tags, imports = ("torchao",), ("torchao",), ("torchao",)

    def needs_cuda(self, recipe: TorchAoRecipe) -> str | None:
        return f"torchao {recipe.scheme} has CUDA kernels only" if recipe.scheme in CUDA_ONLY else None

    def stored_bits(self, recipe: TorchAoRecipe) -> float:
        # int4: a bf16 scale and zero per group; the others a scale per row.
        return 4 + 32 / recipe.group_size if recipe.scheme == "int4_weight_only" else 8.0

    def fallback(self, recipe: TorchAoRecipe, name: str, out_features: int, in_features: int) -> str | None:
        if recipe.scheme == "int4_weight_only" and in_features % recipe.group_size:
            return f"in_features {in_features} is not a multiple of group_size {recipe.group_size}"
        if recipe.scheme == "float8_dynamic_activation" and (in_features % 16 or out_features % 16):
            return f"float8 matmuls need both dims multiple of 16, got {out_features}x{in_features}"
        return None

    def load_config(self, recipe: TorchAoRecipe, keep: list[str]):
        from torchao import quantization as ao
        from transformers import TorchAoConfig

        if recipe.scheme == "int4_weight_only" and recipe.int4_packing_format == "plain" \
                and importlib.util.find_spec("mslk") is None:
            raise ValueError(f"recipe {recipe.name}: int4_packing_format 'plain' needs the mslk package "
                             "(pip install mslk-cuda); 'tile_packed_to_4d' needs nothing more")
        quant_type = {
            "int8_weight_only": lambda: ao.Int8WeightOnlyConfig(),
            "int8_dynamic_activation": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
            "int4_weight_only": lambda: ao.Int4WeightOnlyConfig(
                group_size=recipe.group_size, int4_packing_format=recipe.int4_packing_format,
                int4_choose_qparams_algorithm=recipe.int4_qparams),
            "float8_dynamic_activation": lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()),
        }[recipe.scheme]()
        return TorchAoConfig(quant_type, modules_to_not_convert=keep)


register(TorchAo())
