"""The benchmark's launcher on a CUDA host (issue 34's zygote, docs/benchmark.md "A process of its own"): no zygote
where CUDA exists, each measurement a fresh interpreter whose output reaches its log; the benchmark step on a tiny
random Llama on the GPU, one JSON line a check to stdout."""
import json
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantgate.bench import launcher
from quantgate.settings import BenchmarkSettings
from tasks.benchmark import benchmark


def tiny_llama(folder: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="launcher-"))
    model = tiny_llama(work / "tiny")
    zygote = launcher.lease_zygote({"PATH": "/usr/bin"})
    launcher.release(zygote)
    print(json.dumps({"check": "lease_zygote", "cuda": torch.cuda.is_available(), "zygote": zygote is not None}),
          flush=True)
    settings = BenchmarkSettings(prompt_tokens=16, new_tokens=16, repeats=2)
    for processes in (1, 2):
        out = work / f"p{processes}"
        out.mkdir()
        found = benchmark("reference", str(model), None, "bfloat16", "cuda",
                          settings.model_copy(update={"processes": processes}), str(out)).model_dump()
        logs = sorted(p.name for p in out.glob("*-log.txt"))
        lines = bool(logs) and all("benchmark:" in (out / n).read_text() for n in logs)
        print(json.dumps({"check": "benchmark", "processes": processes, "status": found["status"],
                          "reason": found.get("reason"), "process": found.get("process"),
                          "device": found.get("device"), "path": found.get("latency", {}).get("path"),
                          "decode_ms_per_token": found.get("latency", {}).get("decode_ms_per_token"),
                          "logs": logs, "log_has_lines": lines}),
              flush=True)
    shutil.rmtree(work)


if __name__ == "__main__":
    main()
