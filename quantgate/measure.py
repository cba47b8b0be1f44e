"""Measuring instruments shared by the benchmark and the KV-cache capacity search: the process's
memory lines, a timer, and the memory in use where a model runs."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time

import torch


def proc_status() -> dict[str, int]:
    """This process's memory lines from /proc/self/status, in bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


class Timer:
    """Milliseconds of a block: CUDA events on a GPU, the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.ms = 0.0

    def __enter__(self):
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1000


class GpuMemory:
    """Memory in use on one GPU and its peak since `reset`: the caching allocator's reserved bytes plus
    what it does not hold (the CUDA context, libraries' workspaces), measured once at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        self.total = total
        self.outside = total - free - torch.cuda.memory_reserved(device)

    def in_use(self) -> int:
        return torch.cuda.memory_reserved(self.device) + self.outside

    def held(self) -> int:
        """Bytes in live tensors: what a cache adds, without the allocator's free blocks."""
        return torch.cuda.memory_allocated(self.device)

    def reset(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_reserved(self.device) + self.outside

    def limit(self, budget: int | None) -> None:
        """Make the allocator refuse to grow past `budget` bytes in all (None: the whole GPU again)."""
        fraction = 1.0 if budget is None else max(budget - self.outside, 0) / self.total
        torch.cuda.set_per_process_memory_fraction(min(fraction, 1.0), self.device)

    def close(self) -> None:
        self.limit(None)


class HostMemory:
    """The process's private memory (RssAnon) and its peak since `reset`, sampled every millisecond in a
    thread: on a CPU the model, its cache and its activations all live there."""

    def __init__(self, interval_s: float = 0.001):
        self.interval, self._peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, self.in_use())

    def in_use(self) -> int:
        return proc_status()["RssAnon"]

    def held(self) -> int:
        trim_heap()
        return self.in_use()

    def reset(self) -> None:
        trim_heap()
        self._peak = self.in_use()

    def peak(self) -> int:
        self._peak = max(self._peak, self.in_use())
        return self._peak

    def limit(self, budget: int | None) -> None:
        """No allocator limit on a CPU: the search compares the peak with the budget instead."""

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@functools.cache
def _libc():
    """The C library, looked up once (find_library runs ldconfig): None where it has no malloc_trim."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if hasattr(libc, "malloc_trim") else None


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc keeps them otherwise): freed tensors then
    leave RssAnon, and a measurement that follows starts from what is really held."""
    if libc := _libc():
        libc.malloc_trim(0)


def memory_of(device: torch.device) -> GpuMemory | HostMemory:
    return GpuMemory(device) if device.type == "cuda" else HostMemory()
