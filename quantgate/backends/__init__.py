"""Quantization backends: one module per library, behind one small interface.

A backend tells the steps everything they need about its library: its recipe model, the packages
it needs and whether it needs CUDA, which shapes it leaves in high precision (the plan), how it
quantizes (a transformers config applied while loading, a pass after loading, or both), how it
saves and loads back, and the card's loading snippet. Each module registers itself in one line
(`register(MyBackend())`); the recipe models, the method list and the package lists come from the
registry, so the steps never ask which library a recipe is for. A backend outside this package is a
module named in QUANTGATE_BACKENDS (comma-separated), imported with the built-in ones, in every process
of a run (the benchmark's own included).
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Annotated, ClassVar

import torch
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from quantgate import modeling
from quantgate.files import slug


# transformers writes up to 50 GB a file: a 12B checkpoint in one file is hashed by one thread when it is published;
# shards of 2 GB hash at once (quantgate.files.sha256_files). quanto's save and hqq's own format take no shard size:
# theirs stay one file.
SHARD_SIZE = "2GB"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidateThresholds(Strict):
    """When the validate step warns or fails a recipe. KL is per token, KL(reference || quantized),
    in nats; a recipe file sets its family's own (4-bit recipes drift more than 8-bit ones)."""
    kl_mean_warn: float = Field(0.05, ge=0)
    kl_mean_fail: float = Field(0.25, ge=0)
    kl_p99_warn: float = Field(0.5, ge=0)
    kl_p99_fail: float = Field(3.0, ge=0)
    top1_warn: float = Field(0.85, ge=0, le=1)
    top1_fail: float = Field(0.7, ge=0, le=1)
    # What a multimodal model's vision tower hands its language model, against the reference's (tasks/towers.py).
    embedding_cosine_warn: float = Field(0.98, ge=-1, le=1)
    embedding_cosine_fail: float = Field(0.9, ge=-1, le=1)
    # Long greedy generations: their mean share of repeated 4-grams above the reference's (quantgate/longrange.py).
    # Greedy paths part on a near-tie and one may loop where the other did not: torchao int8 on SmolLM2 (KL 0.002)
    # repeated 0.45 of its 4-grams on one prompt where the reference repeated 0.11 (docs/validation.md).
    repetition_increase_warn: float = Field(0.15, ge=0, le=1)
    repetition_increase_fail: float = Field(0.3, ge=0, le=1)
    # A served LoRA adapter: the share of the tokens whose top-1 it changes in high precision that it still changes
    # the same way on the recipe's base (quantgate/adapters.py). They are near-ties, which any drift moves: on
    # SmolLM2 with a LoRA trained on WikiText, torchao int8 kept 83% of 331, fp8-block64 71%, nf4 39% (docs/validation.md).
    adapter_kept_warn: float = Field(0.6, ge=0, le=1)
    adapter_kept_fail: float = Field(0.3, ge=0, le=1)


Slug = Annotated[str, AfterValidator(slug)]  # a name that becomes a folder


class RecipeBase(Strict):
    name: Slug
    method: str
    description: str = ""
    thresholds: ValidateThresholds = ValidateThresholds()
    # Full dotted module paths (a path also covers everything under it; '*' stands for one
    # path segment). A pattern that matches no module is an error, not a silent no-op.
    skip: list[str] = []


class PlanError(ValueError):
    """A recipe that cannot apply to this model; `field` is the recipe field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


class Backend:
    """What the steps need to know about one quantization library."""
    method: ClassVar[str]  # the recipes' `method`
    recipe: ClassVar[type[RecipeBase]]
    packages: ClassVar[tuple[str, ...]] = ()  # distributions it runs on (env.json records their versions)
    tags: ClassVar[tuple[str, ...]] = ()  # the model card's tags
    imports: ClassVar[tuple[str, ...]] = ()  # modules imported before a measured load, so it times the load alone
    quant_method: ClassVar[str | None] = None  # what transformers writes in config.json's quantization_config
    given: ClassVar[bool] = False  # a checkpoint made elsewhere: fetched and read, not quantized here

    def needs_cuda(self, recipe) -> str | None:
        """Why the recipe cannot run without CUDA, or None."""
        return None

    def stored_bits(self, recipe) -> float | None:
        """Bits one quantized weight takes in the saved checkpoint, its scales included: the disk check's
        estimate. None: not known here, so each counts at its unquantized size."""
        return None

    def kernel(self, recipe) -> str | None:
        """Which kernel runs the recipe's matmuls in this process, where the library leaves it open (the
        record names it); None where there is no choice to report."""
        return None

    def latency_caveat(self, recipe) -> str | None:
        """Why latency measured through transformers here does not stand for serving the checkpoint, or None."""
        return None

    def fallback(self, recipe, name: str, out_features: int, in_features: int) -> str | None:
        """Why a Linear of this shape stays in high precision (None: it is quantized); raises
        PlanError where the recipe cannot apply to it at all."""
        return None

    def experts(self, recipe, name: str, shapes: dict[str, list[int]]) -> str | None:
        """Why a mixture-of-experts block's 3-D expert weights stay in high precision (None: they are
        quantized); raises PlanError where the recipe cannot apply to them at all."""
        return "the library quantizes Linear layers; 3-D expert weights stay in high precision"

    def finer(self, recipe) -> list[tuple[str, dict]]:
        """Variants of the recipe that quantize more finely (smaller blocks or groups), finest last: what changes, in
        words, and the recipe fields that change it. The remedy tries them beside keeping modules."""
        return []

    def quantizes_output_embedding(self, recipe) -> bool:
        """Whether the recipe quantizes the output embedding (the head), which every library here keeps in high
        precision by default."""
        return False

    def check_plan(self, recipe, entries: list[dict]) -> None:
        """Raises PlanError where the library cannot do what the whole plan asks."""

    def check_base(self, recipe, base_config, registry_dir: Path) -> None:
        """Raises PlanError where the recipe cannot apply to the base model at all (before any weight is loaded)."""

    def fused_matmul(self, weights: list[torch.Tensor], bias: torch.Tensor | None) -> torch.nn.Module | str | None:
        """One module computing sibling projections' outputs over the library's own weight tensors stacked along
        the output rows (the GPU fast path's fusion), a reason they cannot stack, or None: not the library's."""
        return None

    def load_config(self, recipe, keep: list[str]):
        """The transformers quantization config that quantizes while loading, or None."""
        return None

    def after_load(self, model: torch.nn.Module, recipe, keep: list[str], tokenizer) -> torch.nn.Module:
        """A pass over the loaded model (quantizing, calibrating); `keep` are full names left alone."""
        return model

    def is_quantized(self, module: torch.nn.Module) -> bool:
        """Whether the library quantized this Linear (the plan is checked against it)."""
        return modeling.is_quantized(module)

    def save(self, model: torch.nn.Module, recipe, path: Path) -> None:
        model.save_pretrained(path, max_shard_size=SHARD_SIZE)

    def load(self, path: Path, device: str, dtype: str = "auto", **load_kwargs) -> torch.nn.Module:
        """A saved checkpoint, computing in `dtype` where the library allows (load_kwargs: max_memory,
        offload_folder, as from_pretrained takes them)."""
        return modeling.load(path, dtype, device, **load_kwargs)

    def snippet(self, path: str) -> str:
        """The model card's loading code."""
        return (f"from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
                f"model = AutoModelForCausalLM.from_pretrained({path!r}, device_map=\"auto\")\n"
                f"tokenizer = AutoTokenizer.from_pretrained({path!r})")


BACKENDS: dict[str, Backend] = {}
BUILTIN = ("bitsandbytes", "torchao", "fp8", "quanto", "hqq", "llmcompressor", "given")  # modules of this package


def quant_method_of(path: Path) -> str | None:
    """The quant_method a checkpoint's config.json names (what transformers wrote when it quantized it), or None."""
    config = json.loads((Path(path) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def register(backend: Backend) -> Backend:
    BACKENDS[backend.method] = backend
    return backend


def methods() -> list[str]:
    return list(BACKENDS)


def backend_of(recipe) -> Backend:
    return BACKENDS[recipe["method"] if isinstance(recipe, dict) else recipe.method]


def parse_recipe(data) -> RecipeBase:
    """A recipe model from its fields (or the model itself); pydantic's error for bad fields, a
    ValueError naming the allowed methods for an unknown one."""
    if isinstance(data, RecipeBase):
        return data
    method = data.get("method") if isinstance(data, dict) else None
    if method not in BACKENDS:
        raise ValueError(f"unknown method {method!r}; allowed methods: {', '.join(BACKENDS)}")
    return BACKENDS[method].recipe.model_validate(data)


def packages() -> list[str]:
    """Every registered backend's distributions, once each, in registry order."""
    return list(dict.fromkeys(p for backend in BACKENDS.values() for p in backend.packages))


for _module in [f"quantgate.backends.{name}" for name in BUILTIN] + os.environ.get("QUANTGATE_BACKENDS", "").split(","):
    if _module.strip():
        importlib.import_module(_module.strip())
