"""transformers' FineGrainedFP8: float8 e4m3 weights in blocks with one scale each, activations quantized
per token and block at run time. Its matmul comes from the Hub (`kernels-community/finegrained-fp8`);
where that cannot be had, torch's block-scaled FP8 matmul runs 128x128 blocks on a Hopper GPU, and quantgate's
reference kernel (fp8_kernel.py) the rest, on a GPU or a CPU."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import PositiveInt

from quantgate import modeling
from quantgate.backends import Backend, PlanError, RecipeBase, fp8_kernel, register


class FineGrainedFp8Recipe(RecipeBase):
    method: Literal["fp8"]
    weight_block_size: tuple[PositiveInt, PositiveInt] = (128, 128)


@functools.cache
def cpu_quantizer():
    """transformers refuses to quantize to FP8 without a GPU ("A GPU or XPU is needed") and dequantizes an
    FP8 checkpoint loaded on a CPU to bf16 without a word; with a kernel for the CPU, its own quantizer
    runs as it is, minus that refusal (the mapping is transformers' registry of quantizers)."""
    import torch
    from transformers.quantizers import auto
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    class CpuFineGrainedFP8Quantizer(FineGrainedFP8HfQuantizer):
        def validate_environment(self, *args, **kwargs):
            if torch.cuda.is_available() or self.quantization_config.dequantize:
                super().validate_environment(*args, **kwargs)

    auto.AUTO_QUANTIZER_MAPPING["fp8"] = CpuFineGrainedFP8Quantizer
    return CpuFineGrainedFP8Quantizer


def ready() -> str:
    """Installs the kernel and the CPU quantizer in this process; the kernel's name."""
    cpu_quantizer()
    return fp8_kernel.install()


class FineGrainedFp8(Backend):
    method, recipe = "fp8", FineGrainedFp8Recipe
    quant_method = "fp8"
    tags = ("fp8",)

    def stored_bits(self, recipe: FineGrainedFp8Recipe) -> float:
        rows, cols = recipe.weight_block_size
        return 8 + 32 / (rows * cols)  # a float32 scale per block

    def kernel(self, recipe: FineGrainedFp8Recipe) -> str:
        return fp8_kernel.kernel_for(ready(), recipe.weight_block_size)

    def finer(self, recipe: FineGrainedFp8Recipe) -> list[tuple[str, dict]]:
        # Halving keeps every dim the blocks divided divisible; 32 is as fine as a scale per block stays cheap.
        rows, cols, found = *recipe.weight_block_size, []
        while rows >= 64 and cols >= 64:
            rows, cols = rows // 2, cols // 2
            found.append((f"{rows}x{cols} weight blocks", {"weight_block_size": [rows, cols]}))
        return found

    def latency_caveat(self, recipe) -> str | None:
        kernel = self.kernel(recipe)
        if kernel == fp8_kernel.REFERENCE:
            return f"measured on the {fp8_kernel.REFERENCE}, a correctness reference, not an FP8 serving kernel"
        if kernel == fp8_kernel.SCALED_MM:  # cuBLAS's GEMM, 4 rows a tile at one token: no faster than bf16 there
            return (f"measured on {fp8_kernel.SCALED_MM}, a GEMM for many rows; servers such as vLLM run block FP8 "
                    "on kernels of their own (CUTLASS, Triton, DeepGEMM), not measured here")
        return None

    def fallback(self, recipe: FineGrainedFp8Recipe, name: str, out_features: int, in_features: int) -> str | None:
        rows, cols = recipe.weight_block_size
        if out_features % rows or in_features % cols:
            raise PlanError("weight_block_size", f"{rows}x{cols} blocks do not divide {name} ({out_features}x"
                            f"{in_features}); allowed: block sizes that divide both dims of every quantized layer, "
                            "or skip the layer")
        return None

    def experts(self, recipe: FineGrainedFp8Recipe, name: str, shapes: dict[str, list[int]]) -> str | None:
        # transformers swaps a block named `.experts` for FP8Experts, one block-scaled 3-D weight per projection.
        if not name.endswith(".experts"):
            return "transformers' FineGrainedFP8 converts expert blocks named '.experts' only"
        for weight, (_, out_features, in_features) in shapes.items():
            self.fallback(recipe, f"{name}.{weight}", out_features, in_features)
        return None

    def load_config(self, recipe: FineGrainedFp8Recipe, keep: list[str]):
        from transformers import FineGrainedFP8Config

        ready()
        return FineGrainedFP8Config(weight_block_size=tuple(recipe.weight_block_size), modules_to_not_convert=keep)

    def after_load(self, model, recipe, keep: list[str], tokenizer):
        fp8_kernel.use_blockwise(model, lay_out=False)  # quantized while loading: it may be saved next
        return model

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs):
        ready()
        model = modeling.load(path, dtype, device, **load_kwargs)
        fp8_kernel.use_blockwise(model, lay_out=True)  # loaded to compute, never saved again
        return model


register(FineGrainedFp8())
