"""A plain decode loop, with no quantgate code: issue 39's yardstick for the benchmark's bf16 decode ("never slower than a
plain loop on the same machine"). transformers' static cache, each decoder layer compiled with torch.compile (its own
graph per layer), SDPA attention, no fused projections, one CUDA graph per decode step; greedy, batch 1.
  python docs/gpu/plain_loop.py CKPT_DIR     one JSON line: decode ms/token, the median of REPEATS runs of NEW tokens
                                              after a PROMPT-token prompt (256, 256, 5), and their spread
COMPILE=0: no compile (the CPU check: no CUDA graph there either)."""
import json
import os
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache


class Loop:
    """One greedy decode step on static buffers (the token, its position), captured in a CUDA graph on a GPU."""

    def __init__(self, model, max_len: int):
        self.model, self.device = model, model.device
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None

    @torch.no_grad()
    def step(self) -> None:
        logits = self.model(input_ids=self.token, cache_position=self.position, past_key_values=self.cache).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device)
        logits = self.model(input_ids=ids, cache_position=positions, past_key_values=self.cache, logits_to_keep=1).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(ids.shape[1])

    def capture(self) -> None:
        self.prefill(torch.zeros(1, 1, dtype=torch.long, device=self.device))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # compiles, then warms up
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def decode_ms(self, ids: torch.Tensor, new: int) -> float:
        self.prefill(ids)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(new - 1):
            self.graph.replay() if self.graph is not None else self.step()
        sync()
        return (time.perf_counter() - t0) * 1000 / (new - 1)


def main(checkpoint: str) -> None:
    prompt, new, repeats = (int(os.environ.get(k, d)) for k, d in (("PROMPT", 256), ("NEW", 256), ("REPEATS", 5)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map=device,
                                                 attn_implementation="sdpa").eval()
    t0 = time.perf_counter()
    if os.environ.get("COMPILE", "1") == "1":
        torch._dynamo.config.cache_size_limit = 64  # each layer's module its own compiled graph
        for layer in model.model.layers:
            layer.compile(fullgraph=True, dynamic=False)
    loop = Loop(model, prompt + new)
    if device == "cuda":
        loop.capture()
    compile_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.get_text_config(decoder=True).vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    loop.decode_ms(ids, new)  # warm-up at full length
    runs = [loop.decode_ms(ids, new) for _ in range(repeats)]
    median = statistics.median(runs)
    print(json.dumps({"loop": "plain", "decode_ms_per_token": round(median, 4), "decode_ms_all": [round(r, 4) for r in runs],
                      "spread": round((max(runs) - min(runs)) / median, 4), "compile_and_capture_s": round(compile_s, 1),
                      "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}),
          flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
