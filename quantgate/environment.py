"""What a run ran on: the versions of every distribution its results rest on (the core's and each registered
backend's and evaluation's), the host and the device. env.json records it; the nightly gate compares it."""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

from quantgate import backends, evaluations

# The core's distributions; each backend's and evaluation's come from their registries.
PACKAGES = ("torch", "transformers", "accelerate", "lm_eval", "prefect", "safetensors", "huggingface_hub", "gguf")


def packages() -> list[str]:
    """Every distribution a run's results rest on: env.json records them, the nightly gate compares them."""
    return list(dict.fromkeys([*PACKAGES, *backends.packages(), *evaluations.packages()]))


def environment() -> dict:
    import psutil
    import torch

    env = {"python": platform.python_version()}
    for name in packages():
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["host"] = {"platform": platform.platform(), "cpu_cores": os.cpu_count(),
                   "memory_bytes": psutil.virtual_memory().total}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = {"name": props.name, "memory_bytes": props.total_memory, "cuda": torch.version.cuda,
                         "count": torch.cuda.device_count(), "driver": _nvidia_driver()}
    else:
        env["device"] = {"name": "cpu", "cuda": None}
    return env


def _nvidia_driver() -> str | None:
    try:
        return Path("/proc/driver/nvidia/version").read_text().split("Kernel Module")[1].split()[0]
    except (OSError, IndexError):
        return None
