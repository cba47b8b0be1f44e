"""How numbers from a run's record read in tables, reports and cards."""
from __future__ import annotations


def gb(n, missing: str = "–") -> str:
    return f"{n / 1e9:.3f} GB" if isinstance(n, (int, float)) else missing


def num(value, fmt: str, missing: str = "–") -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else missing


def peak_memory(bench: dict) -> int | None:
    """The figure a user compares: GPU peak while generating, or host private peak without a GPU."""
    memory = bench.get("memory", {})
    return memory.get("gpu_peak_infer") or memory.get("host_private_peak")
