"""Where a benchmark process's start goes on a CUDA host, and whether the zygote could serve there (issue 39).

On the H100 each measurement process of the flow took 22-23 s from its step's start to its model loaded, less the load
(docs/BENCHMARKS.md, "656 s on the H100"); the zygote that forks measurements on a CPU host is off where CUDA exists.
  python docs/gpu/process_start.py            one JSON line a probe: the imports in a fresh interpreter, timed one by
                                              one; then the zygote's imports, and whether a process forked after them
                                              can use CUDA (plain, and with PYTORCH_NVML_BASED_CUDA_CHECK=1)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = ("torch", "transformers.modeling_utils", "transformers.models.auto.modeling_auto", "quantgate.bench.worker",
         "torchao", "cuda")  # the zygote's imports in its order, then what a measurement adds


def timed_imports() -> None:
    """In this (fresh) interpreter: each step's seconds."""
    import importlib

    times = {}
    for step in STEPS:
        t0 = time.perf_counter()
        if step == "cuda":
            import torch

            if not torch.cuda.is_available():
                break
            torch.zeros(1, device="cuda")  # the context
        else:
            importlib.import_module(step)
        times[step] = round(time.perf_counter() - t0, 2)
    print(json.dumps({"probe": "imports, fresh interpreter", "seconds": times}), flush=True)


def fork_after_imports() -> None:
    """The zygote's imports, then a forked child that puts a tensor on the GPU."""
    import importlib

    for module in STEPS[:4]:
        importlib.import_module(module)
    import torch

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            bad = torch.cuda._is_in_bad_fork()
            torch.zeros(1, device="cuda")
            result = {"in_bad_fork": bad, "cuda_in_child": "ok"}
        except Exception as e:  # noqa: BLE001 - the answer is the error
            result = {"cuda_in_child": f"{type(e).__name__}: {e}"[:300]}
        os.write(write, json.dumps(result).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = json.loads(os.read(read, 65536))
    print(json.dumps({"probe": "fork after the zygote's imports", "nvml_check": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"),
                      "cuda_initialized_in_parent": torch.cuda.is_initialized(), **child}), flush=True)


def main() -> None:
    env = {**os.environ, "PYTHONPATH": f"{os.environ.get('PYTHONPATH', '')}:{ROOT}"}
    for _ in range(2):  # the second with the page cache warm
        subprocess.run([sys.executable, __file__, "imports"], env=env, check=False)
    for nvml in (None, "1"):
        child_env = {k: v for k, v in env.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
        if nvml:
            child_env["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml
        subprocess.run([sys.executable, __file__, "fork"], env=child_env, check=False)


if __name__ == "__main__":
    {"imports": timed_imports, "fork": fork_after_imports}.get(sys.argv[1] if len(sys.argv) > 1 else "", main)()
