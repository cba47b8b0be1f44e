"""A recipe's model as its backend makes and loads it: quantized while loading from the reference checkpoint,
or its saved checkpoint loaded back; and what every step says of a recipe its device cannot run."""
from __future__ import annotations

from pathlib import Path

import torch

from quantgate import modeling
from quantgate.backends import backend_of


def load_quantized(checkpoint: str, recipe, dtype: str, device: str, keep: list[str], tokenizer=None,
                   **load_kwargs) -> torch.nn.Module:
    """The reference checkpoint loaded and quantized as the recipe's backend does it: a config applied
    while loading, then its pass after loading (load_kwargs: max_memory, offload_folder)."""
    backend = backend_of(recipe)
    with modeling.timed(f"quantize {recipe.name}"):
        model = modeling.load(checkpoint, dtype, device, backend.load_config(recipe, keep), **load_kwargs)
        return backend.after_load(model, recipe, keep, tokenizer)


def kernel_of(recipe) -> dict:
    """The record's `kernel`, where the recipe's library leaves the choice of kernel open."""
    return {"kernel": name} if (name := backend_of(recipe).kernel(recipe)) else {}


def load_saved(path: Path, recipe, device: str, dtype: str = "auto") -> torch.nn.Module:
    """A saved checkpoint as its backend loads it, computing in `dtype` where the library allows."""
    return backend_of(recipe).load(Path(path), device, dtype)


def cuda_skip(recipe, device: str) -> dict | None:
    """A step's record for a recipe that cannot run on this machine's device, or None."""
    if device == "cpu" and (why := backend_of(recipe).needs_cuda(recipe)):
        return {"status": "skipped", "reason": f"needs CUDA ({why}); this machine has none"}
    return None


def growth(at_load: int, running: int, what: str) -> str | None:
    """A warning when the weights take more memory running than loaded (1% slack for lazily made buffers)."""
    if running <= at_load * 1.01:
        return None
    return (f"the {what} holds {at_load / 1e9:.3f} GB of weights when loaded and {running / 1e9:.3f} GB once it has "
            "run a forward: its library expands the weights to compute in transformers, so the smaller figure is "
            "storage, not the memory it runs in")
