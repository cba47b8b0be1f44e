"""Where a model goes non-finite: forward hooks on every module, the first module whose output holds NaN or
Inf, its input statistics and, for an overflow, the module whose huge output caused it."""
from __future__ import annotations

import torch


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class NonFiniteScan:
    """Forward hooks on every module. The cheap pass queues each floating output and reduces them in batches with
    one fused max-|x| kernel (a NaN or Inf makes it non-finite; one sync a forward), which also tells how close
    each output came to the range of the dtype the model is served in. `detailed` checks every element and
    records each flagged module's input statistics."""

    BATCH = 64  # outputs held before a reduction: bounds the activations kept alive

    def __init__(self, model: torch.nn.Module, detailed: bool = False):
        self.model, self.detailed = model, detailed
        self.names: list[str] = []
        self.pending: list[torch.Tensor] = []
        self.maxima: list[torch.Tensor] = []
        self.details: dict[str, dict] = {}
        # detailed: each finished module's largest finite |output| and dtype, in order, and where each module
        # started in that list, so a module's input can be traced to the module that produced it.
        self.finished: list[tuple[str, float, str]] = []
        self.started: dict[str, int] = {}

    def __enter__(self):
        self.handles = [module.register_forward_hook(self._hook(name or type(self.model).__name__))
                        for name, module in self.model.named_modules()]
        if self.detailed:
            self.handles += [module.register_forward_pre_hook(self._start(name or type(self.model).__name__))
                             for name, module in self.model.named_modules()]
            # Leaves only: a decoder layer's output holds the huge values its down_proj made, and names less.
            self.leaves = {name for name, module in self.model.named_modules() if not any(module.children())}
        return self

    def _start(self, name: str):
        def hook(module, inputs):
            self.started.setdefault(name, len(self.finished))
        return hook

    def producer(self, name: str) -> dict | None:
        """The module, finished before `name` began, whose output held the largest finite values: where huge
        values that overflow in `name` (or between modules) came from."""
        before = [f for f in self.finished[:self.started.get(name, 0)] if f[1] is not None]
        if not before:
            return None
        module, max_abs, dtype = max(reversed(before), key=lambda f: f[1])
        return {"module": module, "max_abs": max_abs, "dtype": dtype}

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                outs = [output] if output.is_floating_point() and output.numel() else []
            else:
                outs = [t for t in _tensors(output) if t.is_floating_point() and t.numel()]
            if self.detailed:
                if any(not torch.isfinite(t).all() for t in outs):
                    self.names.append(name)
                    self.details.setdefault(name, _statistics(module, inputs, outs))
                if name in self.leaves:
                    finite = [t[torch.isfinite(t)] for t in outs]
                    largest = max((float(t.abs().max()) for t in finite if t.numel()), default=None)
                    self.finished.append((name, largest, str(outs[0].dtype) if outs else None))
                return
            self.pending += outs
            self.names += [name] * len(outs)
            if len(self.pending) >= self.BATCH:
                self._reduce()
        return hook

    def _reduce(self) -> None:
        if not self.pending:
            return
        # One fused kernel per device: a model over several GPUs leaves its outputs on each.
        where: dict[torch.device, list[int]] = {}
        for i, t in enumerate(self.pending):
            where.setdefault(t.device, []).append(i)
        home = self.maxima[0].device if self.maxima else self.pending[0].device
        norms = torch.empty(len(self.pending), dtype=torch.float32, device=home)
        for device, index in where.items():
            found = _max_abs([self.pending[i] for i in index], device)
            norms[torch.tensor(index, device=home)] = found.to(home)
        self.maxima.append(norms)
        self.pending = []

    def flagged(self) -> list[str]:
        """Modules whose output held NaN or Inf, in the order they finished (execution order)."""
        if self.detailed:
            return list(dict.fromkeys(self.names))
        self._reduce()
        if not self.maxima:
            return []
        bad = (~torch.isfinite(torch.cat(self.maxima))).cpu().tolist()
        return list(dict.fromkeys(name for name, b in zip(self.names, bad) if b))

    def beyond(self, limit: float) -> tuple[str, float] | None:
        """The first module whose output held a finite value larger than `limit` (the range of the dtype the model
        is served in, where it computes in a wider one), with that value; None where every output fits."""
        self._reduce()
        if not self.maxima:
            return None
        largest = torch.cat(self.maxima).cpu().tolist()
        return next(((name, m) for name, m in zip(self.names, largest) if limit < m < float("inf")), None)


def _max_abs(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Each tensor's largest |x| in float32 (NaN where it holds one, Inf where it holds one): on a GPU one fused
    kernel for all; on the CPU, where torch's foreach norm converts and loops (5-6 times slower), one max each."""
    if device.type == "cpu":
        return torch.stack([t.abs().amax().float() for t in tensors])
    return torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float32))


def _statistics(module: torch.nn.Module, inputs, outs: list[torch.Tensor]) -> dict:
    ins = [t for t in _tensors(inputs) if t.is_floating_point()]
    finite_in = [t[torch.isfinite(t)] for t in ins]
    return {"input_dtype": str(ins[0].dtype) if ins else None,
            "input_max_abs": max((float(t.abs().max()) for t in finite_in if t.numel()), default=None),
            "input_finite": all(bool(torch.isfinite(t).all()) for t in ins),
            "output_nan": any(bool(torch.isnan(t).any()) for t in outs),
            "output_inf": any(bool(torch.isinf(t).any()) for t in outs),
            "weight_finite": _weight_finite(module), "nonfinite_tensors": nonfinite_tensors(module)}


def _weight_finite(module: torch.nn.Module) -> bool | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    try:
        return bool(torch.isfinite(weight.float()).all())
    except (RuntimeError, TypeError, NotImplementedError):  # packed or subclass weights: not readable this way
        return None


def nonfinite_tensors(module: torch.nn.Module) -> list[str]:
    """The module's own stored tensors (weights, scales, zero points) that hold NaN or Inf, by name."""
    found = []
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        try:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
                found.append(name)
        except (RuntimeError, TypeError, NotImplementedError):  # packed or subclass tensors
            continue
    return found


@torch.no_grad()
def explain_nonfinite(model, ids: torch.Tensor) -> dict | None:
    """Second pass on a prompt that went non-finite: the first module and its input statistics."""
    with NonFiniteScan(model, detailed=True) as scan:
        model(input_ids=ids)
    flagged = scan.flagged()
    if not flagged:
        return None  # the cheap pass's norm overflowed: every value is finite
    first = flagged[0]
    return {"first_nonfinite_module": first, **scan.details[first], "produced_by": scan.producer(first),
            "affected_after": flagged[1:], "affected_count": len(flagged) - 1}


def nonfinite_reason(nonfinite: dict) -> str:
    """Where the output went non-finite and, for an overflow, where the huge values came from."""
    text = f"non-finite output from {nonfinite['first_nonfinite_module']} onward"
    if stored := nonfinite.get("nonfinite_tensors"):
        return text + f" (its stored {', '.join(stored)} {'holds' if len(stored) == 1 else 'hold'} NaN or Inf)"
    if nonfinite.get("weight_finite") is False:
        return text + " (its weight holds NaN or Inf)"
    source = nonfinite.get("produced_by")
    if source and source["dtype"] and source["dtype"].startswith("torch.float"):
        limit = torch.finfo(getattr(torch, source["dtype"].removeprefix("torch."))).max
        if source["max_abs"] > limit / 1e3 or not nonfinite.get("input_finite", True):
            text += (f"; its input came from {source['module']}, whose output reached max |x| {source['max_abs']:.4g} "
                     f"in {source['dtype'].removeprefix('torch.')} (limit {limit:.4g}): an overflow")
    return text


def first_nonfinite_layer(hidden_states: tuple) -> int | None:
    """Index into hidden_states (0 = embeddings, i = output of decoder layer i-1)."""
    return next((i for i, h in enumerate(hidden_states) if not torch.isfinite(h).all()), None)


def serving_limit(served: str | None, computed: str) -> float | None:
    """The largest value the dtype a checkpoint is served in holds, where the gate computes in a wider dtype (a
    float16 checkpoint validated in float32 on a CPU); None where the two agree and an overflow shows itself."""
    if served is None or served == computed:
        return None
    served_max, computed_max = (torch.finfo(getattr(torch, d)).max for d in (served, computed))
    return served_max if served_max < computed_max else None


def overflow_reason(overflow: dict) -> str:
    return (f"{overflow['module']}'s output reached max |x| {overflow['max_abs']:.4g} on prompt {overflow['prompt']}, "
            f"past {overflow['dtype']}'s {overflow['limit']:.4g}: it overflows where the checkpoint is served "
            f"(computed here in {overflow['computed']})")
