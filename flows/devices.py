"""Device slots across runs: a Prefect global concurrency limit for each device a run computes on
(`model.device_lock`), made with `model.device_slots` slots, one held while a model step computes, whatever the number
of workers or hosts sharing the server; the benchmark, while it times, holds every slot, so no other step shares it,
and a turnstile of one slot per device keeps later steps from taking the slots it waits for. Within a run, recipes
gated side by side take turns the same way (Turns)."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import multiprocessing
import threading
import time
from dataclasses import dataclass

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.responses import ConcurrencyLimitWithLeaseResponse
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from quantgate import modeling
from quantgate.runlog import SHOWN, pause, raise_if_signalled
from quantgate.settings import ModelSpec

log = logging.getLogger("quantgate.progress")
TIMED = {"benchmark"}  # steps that measure time: alone on their devices while they measure (Hold.alone)
ASIDE = {"download"}  # runs before any recipe: no turn, no slot (publish hashes files: not beside a benchmark)
TRY_S = 2.0  # the longest wait between two requests for a slot
LEASE_S = 300  # a slot's lease, renewed while its step runs: what a killed run holds it for at most
TURNSTILE = "-turnstile"


@dataclass(frozen=True)
class Devices:
    """The limits a run's model steps hold, and the slots each is made with where it is missing."""
    names: tuple[str, ...] = ()
    slots: int = 1

    def __str__(self) -> str:
        return ", ".join(self.names)


def device_limits(model: ModelSpec, placement: str | dict) -> Devices:
    """The limits a run's model steps hold: `quantgate-gpu-<uuid>` for each GPU it computes on, and with `all`
    `quantgate-cpu-<host>` too (a GPU run's steps use the host's cores as well)."""
    if model.device_lock == "none":
        return Devices(slots=model.device_slots)
    used = [d for d in modeling.devices_used(placement) if d.startswith("gpu-")]
    if model.device_lock == "all":
        used += modeling.devices_used("cpu")
    return Devices(tuple(f"quantgate-{d}" for d in used), model.device_slots)


def made(client, name: str, slots: int) -> int:
    """The limit's slots: made with `slots` where it is missing; one an operator set otherwise is left as it is. Read
    first: the server logs a traceback for every limit made twice (28 in one flow on the GPU)."""
    try:
        size = client.read_global_concurrency_limit_by_name(name).limit
    except ObjectNotFound:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            return slots
        except ObjectAlreadyExists:  # made by another run just now
            size = client.read_global_concurrency_limit_by_name(name).limit
    if size != slots and not name.endswith(TURNSTILE):
        log.warning("%s keeps its size, %d, where model.device_slots asks for %d (`prefect gcl update %s --limit %d` "
                    "changes it)", name, size, slots, name, slots)
    return size


class Turns:
    """Within one run: steps share the machine, a timed step has it alone while it times. A step waiting to be alone
    stops new steps from starting, so recipes gated side by side (model.recipes_at_once) do not keep it waiting, and
    the steps running give way at their next point (quantgate.sharing) where they have them. `wanted` is set while a
    step waits: the recipes' worker processes read it."""

    def __init__(self):
        self.changed = threading.Condition()
        self.sharing, self.alone, self.waiting = 0, False, 0
        self.wanted = multiprocessing.get_context("spawn").Event()

    def wait(self, ready) -> None:
        while not ready():
            self.changed.wait(0.5)  # short waits: a stop lands between them
            raise_if_signalled()

    @contextlib.contextmanager
    def shared(self):
        with self.changed:
            self.wait(lambda: not self.alone and not self.waiting)
            self.sharing += 1
        try:
            yield
        finally:
            with self.changed:
                self.sharing -= 1
                self.changed.notify_all()

    @contextlib.contextmanager
    def upgraded(self):
        """A sharing step alone: its share given up while it waits (two steps waiting so would wait for each other)
        and taken back, at once, after."""
        with self.changed:
            self.waiting += 1
            self.wanted.set()
            try:
                self.sharing -= 1
                try:
                    self.wait(lambda: not self.alone and not self.sharing)
                except BaseException:
                    self.sharing += 1  # the step still ends as one sharing: its hold gives the share up
                    raise
            finally:
                self.waiting -= 1
                if not self.waiting:
                    self.wanted.clear()
            self.alone = True
        try:
            yield
        finally:
            with self.changed:
                self.alone, self.sharing = False, self.sharing + 1
                self.changed.notify_all()

    def give_way(self) -> bool:
        """A sharing step's share given up while a step waits to be alone, and taken back once none waits or is
        alone; False where none waited."""
        with self.changed:
            if not self.waiting:
                return False
            self.sharing -= 1
            self.changed.notify_all()
            try:
                self.wait(lambda: not self.alone and not self.waiting)
            finally:
                self.sharing += 1
        return True


TURNS = Turns()
_holding: contextvars.ContextVar[Hold | None] = contextvars.ContextVar("quantgate_hold", default=None)


class Hold:
    """A step's hold on its devices while it runs: a share of the run's turn (Turns), then a slot of each device across
    runs; a timed step has them to itself (`alone`) while it measures, and shares them while it loads and compiles.
    Steps ASIDE hold nothing."""

    def __init__(self, devices: Devices, group: str, step: str):
        self.devices, self.group, self.step, self.sizes = devices, group, step, None
        self.share, self.slot = contextlib.ExitStack(), contextlib.ExitStack()

    def __enter__(self) -> Hold:
        if self.step not in ASIDE:
            self.share.enter_context(TURNS.shared())
            self.sizes = limit_sizes(self.devices)  # read once a step: its slots are asked for up to three times
            self.slot.enter_context(self.slots(alone=False))
        self.token = _holding.set(self)
        return self

    def slots(self, alone: bool):
        return slots(self.devices, self.group, self.step, alone, self.sizes)

    def __exit__(self, *exc) -> None:
        _holding.reset(self.token)
        self.slot.close()
        self.share.close()

    def give_way(self) -> None:
        """Where a step of this run waits to time alone: this step's share and slot given up until it has timed, then
        taken back (quantgate.sharing)."""
        if self.step in TIMED or self.step in ASIDE or not TURNS.waiting:
            return
        t0 = time.perf_counter()
        self.slot.close()
        try:
            gave = TURNS.give_way()
        finally:
            self.slot.enter_context(self.slots(alone=False))
        if gave:
            log.info("%s: %s gave the device way for %.0f s to a step timing alone", self.group, self.step,
                     time.perf_counter() - t0, extra=SHOWN)

    @contextlib.contextmanager
    def alone(self):
        """The devices to this step alone. Its slot is given back first: the run's turn is always had before the
        devices' slots, so a step waiting for its turn keeps none that a step ahead of it waits for (two benchmarks
        of one run, a step of this run and another run's benchmark). Taken again after, where the step goes on."""
        self.slot.close()
        with TURNS.upgraded(), self.slots(alone=True):
            yield
        self.slot.enter_context(self.slots(alone=False))


def give_way_here() -> None:
    """The calling step's hold gives way (Hold.give_way); nothing outside a step."""
    if (hold := _holding.get()) is not None:
        hold.give_way()


def take(stack: contextlib.ExitStack, names: list[str], occupy: int) -> None:
    """`occupy` slots of each limit under one lease, held (and renewed) until the stack closes. Asked for one request
    at a time, waiting what the server's Retry-After says but at most TRY_S between checks for a stop: Prefect's own
    wait has no end, and its timeout can cancel a request the server grants, leaving the slots held until the lease
    expires."""
    with get_client(sync_client=True) as client:
        while True:
            try:
                response = client.increment_concurrency_slots_with_lease(names=names, slots=occupy, mode="concurrency",
                                                                         lease_duration=LEASE_S)
                break
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 423:  # 423: no slots free yet
                    raise
                pause(min(float(e.response.headers.get("Retry-After", TRY_S)), TRY_S))
    granted = ConcurrencyLimitWithLeaseResponse.model_validate(response.json())
    if len(granted.limits) != len(names):  # a limit deleted meanwhile: two steps would share the device
        client_release(granted.lease_id)
        raise RuntimeError(f"the device limits {sorted(names)} are not all there (found "
                           f"{sorted(limit.name for limit in granted.limits)})")
    stack.callback(client_release, granted.lease_id)
    # A server that misses a renewal for a moment does not stop an hours-long step.
    stack.enter_context(maintain_concurrency_lease(granted.lease_id, LEASE_S, raise_on_lease_renewal_failure=False))


def client_release(lease_id) -> None:
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(lease_id=lease_id)


def limit_sizes(devices: Devices) -> dict[str, int]:
    """Each device limit's slots (its turnstile made too where missing); none where the run holds no devices."""
    if not devices.names:
        return {}
    with get_client(sync_client=True) as client:
        for name in devices.names:
            made(client, name + TURNSTILE, 1)
        return {name: max(made(client, name, devices.slots), 1) for name in devices.names}


@contextlib.contextmanager
def slots(devices: Devices, group: str, step: str, alone: bool, sizes: dict[str, int] | None = None):
    """A slot of each device held for one step, or every slot where it is to have them alone; waited for where other
    runs hold them. A turnstile of one slot per device goes first: a step passes it to take its slot, a step alone
    keeps it until it ends, so steps arriving meanwhile wait behind it instead of taking each slot it waits for.
    `sizes`: the limits' slots (limit_sizes), where the caller has read them."""
    if not devices.names:
        yield
        return
    sizes, turnstiles = sizes or limit_sizes(devices), sorted(name + TURNSTILE for name in devices.names)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if alone:  # the turnstile kept until it ends; limits of one size together, smallest first
            take(stack, turnstiles, 1)
            for count in sorted(set(sizes.values())):
                take(stack, sorted(n for n, c in sizes.items() if c == count), count)
        else:  # through the turnstile to a slot of each device
            with contextlib.ExitStack() as turnstile:
                take(turnstile, turnstiles, 1)
                take(stack, sorted(sizes), 1)
        if (waited := time.perf_counter() - t0) > 1:
            log.info("%s: %s waited %.0f s for %s, held by other steps (of this run or others)", group, step, waited,
                     devices, extra=SHOWN)
        yield
