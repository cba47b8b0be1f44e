"""Points where a long model step lets a step that times have the device to itself. Between two units of its work (a
prompt, a generated token) the step calls give_way(); that does nothing unless its orchestrator said how (ways_to_give),
as quantgate's flow does where recipes are gated side by side: there the step waits at that point while a benchmark
of the same run times, instead of the benchmark waiting for the whole step to end."""
from __future__ import annotations

from typing import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

_wanted: Callable[[], bool] | None = None  # cheap: is a step waiting to time alone?
_give: Callable[[], None] | None = None  # blocks until it has timed


def ways_to_give(wanted: Callable[[], bool] | None, give: Callable[[], None] | None) -> None:
    """How this process gives way: `wanted()` says whether a timed step waits, `give()` waits until it has timed.
    None, None: never."""
    global _wanted, _give
    _wanted, _give = wanted, give


def give_way() -> None:
    """Where a timed step waits for the device: the work queued on the GPU finished, then this step waits until it
    has timed. Otherwise nothing."""
    if _wanted is None or _give is None or not _wanted():
        return
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # the kernels already queued would share the device with its timing
    _give()


class GiveWayEachToken(StoppingCriteria):
    """A generation's stopping criterion that stops nothing: it gives way after each token (transformers' generate asks
    it once a token)."""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        give_way()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def each_token() -> StoppingCriteriaList:
    return StoppingCriteriaList([GiveWayEachToken()])
