"""The benchmark's launcher on a CUDA host (docs/benchmark.md "A process of its own"): no zygote where CUDA exists;
each measurement in a standby started before it was needed (tasks.benchmark.prepare, as a run does after its
download), or, with standbys off, in a fresh interpreter: what each one's start took (process_up_s) on this host,
whose output reaches its log; the benchmark step on a tiny random Llama on the GPU, one JSON line a check to stdout."""
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantgate.bench import launcher
from quantgate.settings import BenchmarkSettings
from tasks.benchmark import benchmark, prepare

SETTINGS = BenchmarkSettings(prompt_tokens=16, new_tokens=16, repeats=2)


def tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def measured(model: Path, out: Path, processes: int, standbys: bool) -> None:
    out.mkdir()
    launcher.stands_by = (lambda: True) if standbys else (lambda: False)
    t0 = time.perf_counter()
    found = benchmark("reference", str(model), None, "bfloat16", "cuda",
                      SETTINGS.model_copy(update={"processes": processes}), str(out)).model_dump()
    logs = sorted(p.name for p in out.glob("*-log.txt"))
    lines = bool(logs) and all("benchmark:" in (out / n).read_text() for n in logs)
    print(json.dumps({"check": "benchmark", "processes": processes, "standbys": standbys, "status": found["status"],
                      "reason": found.get("reason"), "process": found.get("process"),
                      "process_up_s": found.get("process_up_s"), "prepare_s": found.get("prepare_s"),
                      "load_s": found.get("load_s"), "first_forward_s": found.get("first_forward_s"),
                      "step_s": round(time.perf_counter() - t0, 2), "device": found.get("device"),
                      "path": found.get("latency", {}).get("path"),
                      "decode_ms_per_token": found.get("latency", {}).get("decode_ms_per_token"),
                      "logs": logs, "log_has_lines": lines}), flush=True)


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="launcher-"))
    prepare()  # as a run does after its download: the first standby imports while the model is made
    zygote = launcher.lease_zygote({"PATH": "/usr/bin"})
    launcher.release(zygote)
    print(json.dumps({"check": "lease_zygote", "cuda": torch.cuda.is_available(), "zygote": zygote is not None,
                      "stands_by": launcher.stands_by()}), flush=True)
    model = tiny_llama(work / "tiny")
    time.sleep(20)  # the standby's imports done, as a run's would be by its first benchmark
    measured(model, work / "standby", 1, standbys=True)
    measured(model, work / "fresh", 1, standbys=False)
    measured(model, work / "two", 2, standbys=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
