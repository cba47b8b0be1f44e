"""Sibling projections (q, k, v; gate, up) as one matmul over their concatenated weights, on the GPU fast path: at
batch 1 each is a GEMV that pays a launch and, when small (k, v), underuses the memory bus. Plain weights stack
here; a quantization library's own weight tensors stack through its backend's `fused_matmul` hook."""
from __future__ import annotations

import gc
from collections import Counter

import torch

# Sibling projections that read the same input; the GPU fast path runs each group as one matmul.
FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class PlainMatmul(torch.nn.Module):
    """x @ weight.T + bias over stacked weights (a tensor subclass's own linear where it has one)."""
    padding_bytes_dropped = 0

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class FusedLinear(torch.nn.Module):
    """The first sibling's call computes the one matmul and the others take their columns of the same result; the
    cache empties after the last sibling, so torch.compile traces one matmul and guards on a state that is the
    same at every call."""

    def __init__(self, matmul: torch.nn.Module, parts: int):
        super().__init__()
        self.matmul, self.parts, self.calls, self.cached = matmul, parts, 0, None

    def output(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is None or self.cached[0] is not x:
            self.cached = (x, self.matmul(x))
        y = self.cached[1]
        self.calls += 1
        if self.calls == self.parts:
            self.cached, self.calls = None, 0
        return y


class FusedPart(torch.nn.Module):
    def __init__(self, fused: FusedLinear, start: int, end: int):
        super().__init__()
        self.fused, self.start, self.end = fused, start, end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused.output(x)[..., self.start:self.end]


def fused_matmul(weights: list[torch.Tensor], bias: torch.Tensor | None, backend=None) -> torch.nn.Module | str:
    """One matmul over the weights stacked along the output dimension, or why they cannot be stacked."""
    if len({w.shape[1] for w in weights}) > 1:
        return "different input sizes"
    if all(type(w) in (torch.Tensor, torch.nn.Parameter) for w in weights):
        return PlainMatmul(torch.cat([w.detach() for w in weights]), bias)
    made = backend.fused_matmul(weights, bias) if backend is not None else None
    return made if made is not None else f"{type(weights[0]).__name__} weights"


def unfusable(parts: list[torch.nn.Module]) -> str | None:
    """Why a group of sibling Linears cannot run as one matmul, or None."""
    # Subclasses (bitsandbytes' Linear4bit, quanto's) have forwards of their own; hooks (offloading) fetch weights.
    if any(type(p) is not torch.nn.Linear or p._forward_hooks or p._forward_pre_hooks or hasattr(p, "_hf_hook")
           for p in parts):
        return f"{type(parts[0]).__name__} modules or hooks"
    if len({p.bias is None for p in parts}) > 1:
        return "some with bias"
    return None


def replace(module: torch.nn.Module, names: tuple[str, ...], parts: list, group: FusedLinear) -> None:
    start = 0
    for name, part in zip(names, parts):
        setattr(module, name, FusedPart(group, start, start + part.weight.shape[0]))
        start += part.weight.shape[0]
        # torchao binds each quantized Linear's extra_repr to the module itself: a reference cycle that only the
        # cycle collector frees. Broken here, each layer's replaced weights go at once.
        for attr, value in list(vars(part).items()):
            if getattr(value, "__self__", None) is part:
                delattr(part, attr)


def fuse_projections(model: torch.nn.Module, backend=None) -> dict:
    """Replace each group of sibling projections by one FusedLinear; counts of what was fused and of why a group
    was not. `backend`: the recipe's, which stacks its library's weight tensors."""
    fused, unfused, dropped = Counter(), Counter(), 0
    # The parents only: a list that held the projections themselves would keep every replaced weight alive.
    parents = [m for m in model.modules() if any(hasattr(m, names[0]) for names in FUSABLE)]
    for module in parents:
        for names in FUSABLE:
            parts = [getattr(module, n, None) for n in names]
            if not all(isinstance(p, torch.nn.Linear) for p in parts):
                continue
            label = "+".join(names)
            bias = None if parts[0].bias is None else torch.cat([p.bias.detach() for p in parts])
            matmul = unfusable(parts) or fused_matmul([p.weight for p in parts], bias, backend)
            if isinstance(matmul, str):
                unfused[f"{label}: {matmul}"] += 1
                continue
            dropped += matmul.padding_bytes_dropped
            replace(module, names, parts, FusedLinear(matmul, len(parts)))
            fused[label] += 1
    gc.collect()  # any other cycle
    return {"fused": dict(fused), "unfused": dict(unfused), "padding_bytes_dropped": dropped}
