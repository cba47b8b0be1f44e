"""One step at a time per device: a Prefect global concurrency limit of 1 for each device a run computes on
(`model.device_lock`), held while a step computes, whatever the number of workers or hosts sharing the server."""
from __future__ import annotations

import contextlib
import logging
import time

from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency

from quantgate import modeling
from quantgate.runlog import SHOWN
from quantgate.settings import ModelSpec

log = logging.getLogger("quantgate.progress")


def device_limits(model: ModelSpec, placement: str | dict) -> tuple[str, ...]:
    """The names of the limits a run's model steps hold: `quantgate-gpu-<uuid>`, `quantgate-cpu-<host>`."""
    if model.device_lock == "none":
        return ()
    used = modeling.devices_used(placement)
    return tuple(f"quantgate-{d}" for d in used if model.device_lock == "all" or d.startswith("gpu-"))


@contextlib.contextmanager
def held(names: tuple[str, ...], group: str, step: str):
    """The devices held for one step; made where missing (limit 1), waited for where another run holds them."""
    if not names:
        yield
        return
    with get_client(sync_client=True) as client:
        for name in names:
            client.upsert_global_concurrency_limit_by_name(name, 1)
    t0 = time.perf_counter()
    # strict: a limit that vanished raises rather than letting two steps share the device
    with concurrency(list(names), occupy=1, strict=True):
        if (waited := time.perf_counter() - t0) > 1:
            log.info("%s: %s waited %.0f s for %s, held by another run", group, step, waited, ", ".join(names),
                     extra=SHOWN)
        yield
