"""Measuring instruments shared by the benchmark and the KV-cache capacity search: the process's memory lines,
a timer, the one sampling thread that keeps memory peaks per phase, and the memory in use where a model runs."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading
import time
from contextlib import contextmanager

import psutil
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


def process_age_s() -> float:
    """Seconds since this process began (its fork; for an interpreter, the fork before its exec), from /proc."""
    with open("/proc/self/stat") as f:
        start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, counted after the name
    with open("/proc/uptime") as f:
        uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


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


class MemorySampler:
    """Samples host private (RssAnon) and file-backed (RssFile) memory every few milliseconds
    in a thread, and GPU peaks per phase; `with sampler.phase("load"): ...` labels the samples."""

    def __init__(self, interval_ms: float = 5.0, gpu: bool = True):
        self.interval, self.gpu = interval_ms / 1000, gpu and torch.cuda.is_available()
        self.baseline = proc_status()
        self.peaks: dict[str, dict[str, int | None]] = {}
        self._current: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        current = self._current  # read once: the main thread may end the phase meanwhile
        if current is None:
            return
        status = proc_status()
        peak = self.peaks[current]
        peak["host_private_peak"] = max(peak["host_private_peak"], status["RssAnon"])
        peak["host_file_peak"] = max(peak["host_file_peak"], status["RssFile"])

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def begin(self, name: str) -> dict:
        """Start (or start again) the phase `name`: its peaks from now on."""
        self.peaks[name] = {"host_private_peak": 0, "host_file_peak": 0, "gpu_peak_allocated": None,
                            "gpu_peak_reserved": None}
        if self.gpu:
            for gpu in range(torch.cuda.device_count()):
                torch.cuda.synchronize(gpu)
                torch.cuda.reset_peak_memory_stats(gpu)
        self._current = name
        self._sample()
        return self.peaks[name]

    def sample(self) -> None:
        self._sample()

    @contextmanager
    def phase(self, name: str):
        peaks = self.begin(name)
        try:
            yield peaks
        finally:
            self._sample()
            self._current = None
            if self.gpu:
                gpus = range(torch.cuda.device_count())
                for gpu in gpus:
                    torch.cuda.synchronize(gpu)
                # Each GPU's own peak; the headline figures are their sum (one GPU: its peak, as before).
                allocated = {gpu: torch.cuda.max_memory_allocated(gpu) for gpu in gpus}
                self.peaks[name].update(gpu_peak_allocated=sum(allocated.values()),
                                        gpu_peak_reserved=sum(torch.cuda.max_memory_reserved(g) for g in gpus),
                                        **({"gpu_peak_allocated_by_device": allocated} if len(allocated) > 1 else {}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class HostMemory:
    """The process's private memory (RssAnon) and its peak since `reset`, sampled every millisecond by the
    sampler's thread: on a CPU the model, its cache and its activations all live there."""

    def __init__(self, interval_s: float = 0.001):
        self.sampler = MemorySampler(interval_s * 1000, gpu=False)
        self.sampler.begin("held")

    def in_use(self) -> int:
        return proc_status()["RssAnon"]

    def held(self) -> int:
        trim_heap()
        return self.in_use()

    def reset(self) -> None:
        trim_heap()
        self.sampler.begin("held")

    def peak(self) -> int:
        self.sampler.sample()
        return self.sampler.peaks["held"]["host_private_peak"]

    def limit(self, budget: int | None) -> None:
        """No allocator limit on a CPU: the search compares the peak with the budget instead."""

    def close(self) -> None:
        self.sampler.close()


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


BUSY_CORES = 0.5  # other processes' CPU use, in cores, past which a timing shared its machine


def others_busy(measure):
    """measure()'s result and how many CPU cores other processes kept busy while it ran: a figure timed on a
    machine shared with another run (two runs at once measured 41x apart on one CPU) is not comparable."""
    me = psutil.Process()

    def busy(t) -> float:
        return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)

    def own(t) -> float:
        return t.user + t.system + t.children_user + t.children_system

    start, system, mine = time.monotonic(), psutil.cpu_times(), me.cpu_times()
    result = measure()
    wall = time.monotonic() - start
    others = busy(psutil.cpu_times()) - busy(system) - (own(me.cpu_times()) - own(mine))
    return result, round(max(0.0, others / wall), 2) if wall > 0 else 0.0
