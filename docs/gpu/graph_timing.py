"""One kernel call's time at batch 1, as a decode step sees it: the calls over weight copies that exceed L2, replayed from a
CUDA graph; the median of 20 replays, per copy, in microseconds (docs/gpu/int4_kernels.py, docs/gpu/fp8_kernels.py)."""
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from quantgate.measure import Timer  # noqa: E402


def graph_us(calls: list, copies: int) -> float:
    for call in calls:  # warm-up (and Triton's compile), outside the graph
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(20):
        with Timer(torch.device("cuda")) as t:
            graph.replay()
        times.append(t.ms / copies)
    del graph
    return statistics.median(times) * 1000
