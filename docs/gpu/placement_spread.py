"""Does where the weights sit in GPU memory move the decode figure? One process, one compile: the bf16
Gemma-3-12B-shaped checkpoint decoded through the benchmark's fast path, then PLACEMENTS times every weight
and buffer copied to fresh memory (after a spacer of a random size, so the allocator does not hand back the
same blocks), the CUDA graph captured again, and the decode measured again. Kernels, clocks and the process
stay the same; only the addresses change.
  python docs/gpu/placement_spread.py CKPT_DIR      (one JSON line per placement)
With COMPILES=N instead: N compiles in the same process (dynamo reset, inductor's caches off), each measured;
CD=0 turns inductor's coordinate-descent tuning off (on otherwise, as the placements run). SCOPE: layers (the step's
default, one decoder layer compiled per layer type) or model (the whole step, as the figures before the flow's second
H100 run were measured). AUTOTUNE_POINTWISE=1: inductor times several configs per pointwise kernel (the step's default
is off; every figure before that setting was measured with it on)."""
import json
import os
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from quantgate import modeling  # noqa: E402
from quantgate.bench.decode import StaticDecoder, decode_attention, prompt_ids  # noqa: E402
from quantgate.bench.fusion import fuse_projections  # noqa: E402


def moved(model: torch.nn.Module, spacer_mb: int) -> torch.Tensor:
    """Every parameter and buffer copied to new memory, placed after a spacer that is kept alive."""
    spacer = torch.empty(spacer_mb << 20, dtype=torch.uint8, device="cuda")
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
    torch.cuda.synchronize()
    return spacer


def main(checkpoint: str) -> None:
    random.seed(0)
    model = modeling.load(checkpoint, "bfloat16", "cuda")
    fuse_projections(model)
    ids = prompt_ids(model.config.get_text_config().vocab_size, 1, 256, torch.device("cuda"))
    scope, pointwise = os.environ.get("SCOPE", "layers"), os.environ.get("AUTOTUNE_POINTWISE", "0") == "1"
    if os.environ.get("COMPILES"):
        import torch._inductor.config as inductor

        inductor.fx_graph_cache = inductor.autotune_local_cache = False
        tuned = os.environ.get("CD", "1") == "1"
        for compile_ in range(int(os.environ["COMPILES"])):
            torch._dynamo.reset()
            with decode_attention("math"):
                decoder = StaticDecoder(model, 1, 512, compiled=True, coordinate_descent=tuned, compile_scope=scope,
                                        autotune_pointwise=pointwise)
            decoder.run(ids, 256)
            figures = [decoder.run(ids, 256)[1] for _ in range(3)]
            print(json.dumps({"compile": compile_, "coordinate_descent": tuned, "compile_scope": scope,
                              "compile_s": decoder.compile_s, "decode_ms_per_token": round(statistics.median(figures), 4),
                              "repeats": [round(f, 4) for f in figures]}), flush=True)
            del decoder
        return
    with decode_attention("math"):
        decoder = StaticDecoder(model, 1, 512, compiled=True, coordinate_descent=True, compile_scope=scope,
                                autotune_pointwise=pointwise)
    spacers = []
    for placement in range(int(os.environ.get("PLACEMENTS", 6))):
        if placement:
            spacers.append(moved(model, random.randint(1, 2048)))
            with decode_attention("math"):
                decoder._warm_and_capture()  # the graph holds the old addresses: capture it again
        decoder.run(ids, 256)
        figures = [decoder.run(ids, 256)[1] for _ in range(3)]
        print(json.dumps({"placement": placement, "decode_ms_per_token": round(statistics.median(figures), 4),
                          "repeats": [round(f, 4) for f in figures],
                          "first_weight_address": hex(next(model.parameters()).data_ptr()),
                          "allocated_gb": round(torch.cuda.memory_allocated() / 1e9, 2)}), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1])
