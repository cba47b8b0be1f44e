"""HQQ (Half-Quadratic Quantization): calibration-free 1 to 8-bit weights in groups, through the `hqq`
package's own model API after loading (transformers 5.23's HqqConfig raises "HQQ is not available
yet" when asked to quantize), saved in hqq's format (config.json, qmodel.pt of plain tensors, which
hqq loads with weights_only=True)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from pydantic import PositiveInt

from quantgate import modeling
from quantgate.backends import Backend, PlanError, RecipeBase, register


class HqqRecipe(RecipeBase):
    method: Literal["hqq"]
    nbits: Literal[1, 2, 3, 4, 8] = 4
    group_size: PositiveInt = 64
    axis: Literal[0, 1] = 1  # 1: groups along the input dimension, the layout fast kernels take


class Hqq(Backend):
    method, recipe = "hqq", HqqRecipe
    quant_method = "hqq"
    packages, tags, imports = ("hqq",), ("hqq",), ("hqq",)

    def stored_bits(self, recipe: HqqRecipe) -> float:
        return recipe.nbits + 32 / recipe.group_size  # a 16-bit scale and zero per group

    def finer(self, recipe: HqqRecipe) -> list[tuple[str, dict]]:
        # Halving keeps every dim the groups divided divisible; below 32 the scales cost more than a bit a weight.
        size, found = recipe.group_size, []
        while size >= 64 and size % 2 == 0:
            size //= 2
            found.append((f"groups of {size}", {"group_size": size}))
        return found

    def fallback(self, recipe: HqqRecipe, name: str, out_features: int, in_features: int) -> str | None:
        # HQQ groups the weight along `axis` and has no layout for a dimension the groups do not divide.
        size = in_features if recipe.axis == 1 else out_features
        if size % recipe.group_size:
            raise PlanError("group_size", f"groups of {recipe.group_size} do not divide {name} ({out_features}x"
                            f"{in_features}) along axis {recipe.axis}; allowed: a group size that divides it, or "
                            "skip the layer")
        return None

    def check_plan(self, recipe: HqqRecipe, entries: list[dict]) -> None:
        # transformers skips HQQ layers by kind (model.layers.3.mlp.down_proj -> mlp.down_proj), not by path.
        kinds = {}
        for entry in entries:
            kinds.setdefault(layer_kind(entry["module"]), set()).add(entry["status"])
        for entry in entries:
            if entry["status"] == "skipped" and "quantized" in kinds[layer_kind(entry["module"])]:
                raise PlanError("skip", f"HQQ skips every layer of a kind, not one path: skipping {entry['module']} "
                                f"would also skip every '{layer_kind(entry['module'])}'; allowed: skip all of them "
                                f"(e.g. model.layers.*.{layer_kind(entry['module'])}) or none")

    def after_load(self, model, recipe: HqqRecipe, keep: list[str], tokenizer):
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        config = BaseQuantizeConfig(nbits=recipe.nbits, group_size=recipe.group_size, axis=recipe.axis)
        skipped = {layer_kind(name) for name in keep}
        kinds = {layer_kind(n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
        first = next(p for p in model.parameters() if p.is_floating_point())
        AutoHQQHFModel.quantize_model(model, quant_config={k: None if k in skipped else config for k in kinds},
                                      compute_dtype=first.dtype, device=str(first.device))
        return model

    def save(self, model, recipe, path: Path) -> None:
        from hqq.models.hf.base import AutoHQQHFModel

        AutoHQQHFModel.save_quantized(model, str(path))

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs):
        from hqq.models.hf.base import AutoHQQHFModel

        if dtype == "auto":
            saved = json.loads((Path(path) / "config.json").read_text())
            dtype = saved.get("dtype") or saved.get("torch_dtype") or "bfloat16"
        return AutoHQQHFModel.from_quantized(str(path), device=modeling.single_device(device), compute_dtype=getattr(torch, dtype)).eval()

    def snippet(self, path: str) -> str:
        return (f"import torch\nfrom hqq.models.hf.base import AutoHQQHFModel\nfrom transformers import AutoTokenizer\n\n"
                f"model = AutoHQQHFModel.from_quantized({path!r}, device=\"cuda\", compute_dtype=torch.bfloat16)\n"
                f"tokenizer = AutoTokenizer.from_pretrained({path!r})")


def layer_kind(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in ("model", "layers") and not part.isnumeric())


register(Hqq())
