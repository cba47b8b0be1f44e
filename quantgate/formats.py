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


def tower_measures(t: dict, cosine: str = "embedding cosine") -> str:
    """One tower's validation figures, as the report and the card print them."""
    return (f"{cosine} mean {num(t['embedding_cosine_mean'], '.4f')}, min {num(t['embedding_cosine_min'], '.4f')}; "
            f"{t['kind']}-prompt KL mean {num(t['kl_mean'], '.4f')}, top-1 {num(t['top1_agreement'], '.3f')}; "
            f"first non-finite module {t['first_nonfinite_module'] or 'none'}")


def error_line(e: BaseException) -> str:
    """An exception as one line for a record or a message: its type and the first line of what it says."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
