"""Reference step: the unquantized model, measured once per run for every recipe to compare with."""
from __future__ import annotations

from prefect import task

from quantgate import modeling


def reference(checkpoint: str, dtype: str, device: str) -> dict:
    model = modeling.load(checkpoint, dtype, modeling.resolve_device(device))
    return {"real_bytes": modeling.real_bytes(model), "dtype": dtype,
            "footprint_reported_by_transformers": model.get_memory_footprint()}


reference_task = task(reference, name="reference")
