"""torchao: int8 and int4 weights, float8 and int8 dynamic activations, quantized while loading."""
from __future__ import annotations

import importlib.util
from typing import Literal

import torch
from pydantic import PositiveInt

from quantgate import modeling
from quantgate.backends import Backend, RecipeBase, register

CUDA_ONLY = ("int4_weight_only", "float8_dynamic_activation")
TINYGEMM_K_TILE = 128  # k values per tile of tinygemm's layout with torchao's inner_k_tiles of 8
HEAD_ROWS = 16384  # a head's rows quantized at a time: HQQ's float32 copies of a part, not of the whole head


class TorchAoRecipe(RecipeBase):
    method: Literal["torchao"]
    scheme: Literal["int8_weight_only", "int8_dynamic_activation", "int4_weight_only", "float8_dynamic_activation"]
    group_size: PositiveInt = 128
    # tile_packed_to_4d runs on torch's tinygemm kernel. plain (and torchao's default, preshuffled)
    # need the `mslk` package (PyPI: mslk-cuda, CUDA 13 builds), which is not a dependency: at
    # batch 1 on the H100 both ran slower than tinygemm (docs/BENCHMARKS.md).
    int4_packing_format: Literal["tile_packed_to_4d", "plain"] = "tile_packed_to_4d"
    int4_qparams: Literal["hqq", "tinygemm"] = "hqq"
    # The head too (untied from the input embedding, which stays): with a large vocabulary it is a large share of
    # what a 4-bit decode step reads at batch 1 (docs/BENCHMARKS.md).
    quantize_output_embedding: bool = False


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

    def quantizes_output_embedding(self, recipe: TorchAoRecipe) -> bool:
        return recipe.quantize_output_embedding

    def load_config(self, recipe: TorchAoRecipe, keep: list[str]):
        from transformers import TorchAoConfig

        if recipe.scheme == "int4_weight_only" and recipe.int4_packing_format == "plain" \
                and importlib.util.find_spec("mslk") is None:
            raise ValueError(f"recipe {recipe.name}: int4_packing_format 'plain' needs the mslk package "
                             "(pip install mslk-cuda); 'tile_packed_to_4d' needs nothing more")
        return TorchAoConfig(quant_type(recipe), modules_to_not_convert=keep)

    def after_load(self, model, recipe: TorchAoRecipe, keep: list[str], tokenizer):
        # A tied head is not quantized while loading: transformers ties it to the embedding after.
        name = modeling.output_embedding_name(model) if recipe.quantize_output_embedding else None
        if name is None or name in keep or modeling.is_quantized(model.get_output_embeddings()):
            return model
        from torchao.quantization import quantize_

        head = modeling.untie_output_embedding(model)
        if recipe.scheme == "int4_weight_only" and recipe.int4_packing_format == "tile_packed_to_4d":
            quantize_by_rows(head, quant_type(recipe))
        else:
            quantize_(model, quant_type(recipe), filter_fn=lambda module, _: module is head)
        return model

    def fused_matmul(self, weights: list[torch.Tensor], bias: torch.Tensor | None) -> torch.nn.Module | str | None:
        from quantgate.bench.fusion import PlainMatmul

        first, kind = weights[0], type(weights[0]).__name__
        if kind != "Int4TilePackedTo4dTensor" or any(type(w) is not type(first) for w in weights):
            return None
        # The last part's padding too: the fused output is cut apart at each part's rows.
        if any(w.shape[0] % 8 for w in weights) or not stackable(weights):
            return f"{kind}: padded rows, activation scales or different groups"
        stacked = stacked_rows(weights)
        group = tinygemm_group(stacked)
        return TinygemmMatmul(stacked, bias, group) if group else PlainMatmul(stacked, bias)


def quant_type(recipe: TorchAoRecipe):
    """torchao's config for the recipe's scheme."""
    from torchao import quantization as ao

    return {
        "int8_weight_only": lambda: ao.Int8WeightOnlyConfig(),
        "int8_dynamic_activation": lambda: ao.Int8DynamicActivationInt8WeightConfig(),
        "int4_weight_only": lambda: ao.Int4WeightOnlyConfig(
            group_size=recipe.group_size, int4_packing_format=recipe.int4_packing_format,
            int4_choose_qparams_algorithm=recipe.int4_qparams),
        "float8_dynamic_activation": lambda: ao.Float8DynamicActivationFloat8WeightConfig(granularity=ao.PerRow()),
    }[recipe.scheme]()


def quantize_by_rows(linear: torch.nn.Module, config, rows: int = HEAD_ROWS) -> None:
    """The Linear's weight quantized by `config` (int4 in tinygemm's layout) `rows` output rows at a time, the parts
    stacked into one weight. torchao quantizes a weight at once, in float32 copies with HQQ's search, which for a
    large vocabulary's head took more GPU memory than the whole load before it (docs/BENCHMARKS.md, "The head in int4
    too")."""
    from torchao.quantization import quantize_

    if rows % 8:
        raise ValueError(f"rows {rows}: parts stack in whole 8-row tiles, so rows must be a multiple of 8")
    weight, parts = linear.weight, []
    for start in range(0, weight.shape[0], rows):
        part = torch.nn.Linear(weight.shape[1], min(rows, weight.shape[0] - start), bias=False, device="meta")
        part.weight = torch.nn.Parameter(weight[start:start + rows], requires_grad=False)
        quantize_(part, config)
        parts.append(part.weight)
    if not stackable(parts):
        raise ValueError(f"quantized by rows, {linear} holds {type(parts[0]).__name__} parts that do not stack")
    linear.weight = torch.nn.Parameter(stacked_rows(parts), requires_grad=False)


def stackable(weights: list) -> bool:
    """Whether int4 weights stack along their rows (stacked_rows): tinygemm's layout, the same groups, no activation
    scales, and every one but the last whole 8-row tiles (padding only at the end)."""
    first = weights[0]
    return (type(first).__name__ == "Int4TilePackedTo4dTensor" and all(type(w) is type(first) for w in weights)
            and all(w.act_pre_scale is None and w.block_size == first.block_size for w in weights)
            and not any(w.shape[0] % 8 for w in weights[:-1]))


def stacked_rows(weights: list):
    """One int4 weight of the weights' rows in order. tinygemm's layout: qdata [n/8, k/128, 32, 4] and scale_and_zero
    [k/group, n, 2], so rows stack along those dimensions."""
    first = weights[0]
    return type(first)(torch.cat([w.qdata for w in weights]), torch.cat([w.scale_and_zero for w in weights], 1),
                       first.block_size, torch.Size([sum(w.shape[0] for w in weights), first.shape[1]]))


def tinygemm_group(weight) -> int | None:
    """The group size of a tinygemm-layout int4 weight whose padding can be dropped, else None."""
    if weight.act_pre_scale is not None:
        return None
    group, k = weight.block_size[-1], weight.shape[1]
    inner_k_tiles = weight.qdata.shape[-1] * 2
    if inner_k_tiles * 16 != TINYGEMM_K_TILE or k % TINYGEMM_K_TILE or k % group:
        return None
    return group


class TinygemmMatmul(torch.nn.Module):
    """torch's tinygemm int4 kernel over a stacked weight, without torchao's k padding: torchao pads in_features to
    a multiple of 1024, so each call pads its input (one more kernel after every norm that feeds a padded
    projection at batch 1); tinygemm needs only whole 128-wide k-tiles, and its layout keeps each k-tile apart, so
    the padding's tiles drop off."""

    def __init__(self, weight, bias: torch.Tensor | None, group: int):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group = group
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        # Copies of their own: a view kept the padding's whole storage alive.
        self.register_buffer("qdata", weight.qdata[:, : self.in_features // TINYGEMM_K_TILE].clone())
        self.register_buffer("scale_and_zero", weight.scale_and_zero[: self.in_features // group].clone())
        self.padding_bytes_dropped = (weight.qdata.nbytes + weight.scale_and_zero.nbytes - self.qdata.nbytes
                                      - self.scale_and_zero.nbytes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # No output padding to cut: only row counts that are multiples of 8 were stacked.
        y = torch.ops.aten._weight_int4pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous(),
                                               self.qdata, self.group, self.scale_and_zero)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


register(TorchAo())
