"""One step at a time per device: a Prefect global concurrency limit of 1 for each device a run computes on
(`model.device_lock`), held while a step computes, whatever the number of workers or hosts sharing the server."""
from __future__ import annotations

import contextlib
import logging
import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from quantgate import modeling
from quantgate.runlog import SHOWN
from quantgate.settings import ModelSpec

log = logging.getLogger("quantgate.progress")


def device_limits(model: ModelSpec, placement: str | dict) -> tuple[str, ...]:
    """The names of the limits a run's model steps hold: `quantgate-gpu-<uuid>` for each GPU it computes on, and
    with `all` `quantgate-cpu-<host>` too (a GPU run's steps use the host's cores as well)."""
    if model.device_lock == "none":
        return ()
    used = [d for d in modeling.devices_used(placement) if d.startswith("gpu-")]
    if model.device_lock == "all":
        used += modeling.devices_used("cpu")
    return tuple(f"quantgate-{d}" for d in used)


def made(client, name: str) -> None:
    """The limit of 1, made where it is missing; one an operator set otherwise is left as it is."""
    try:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    except ObjectAlreadyExists:  # made earlier, or by another run just now
        pass


@contextlib.contextmanager
def held(names: tuple[str, ...], group: str, step: str):
    """The devices held for one step; made where missing (limit 1), waited for where another run holds them."""
    if not names:
        yield
        return
    with get_client(sync_client=True) as client:
        for name in names:
            made(client, name)
    t0 = time.perf_counter()
    # strict: a limit that vanished raises rather than letting two steps share the device; a server that misses a
    # lease renewal for a moment does not stop an hours-long step
    with concurrency(list(names), occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        if (waited := time.perf_counter() - t0) > 1:
            log.info("%s: %s waited %.0f s for %s, held by another run", group, step, waited, ", ".join(names),
                     extra=SHOWN)
        yield
