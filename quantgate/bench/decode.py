"""Greedy decoding, timed: eagerly with a dynamic KV cache, or from a static KV cache whose decode step is compiled
(one decoder layer per layer type, or the whole step) and captured in a CUDA graph."""
from __future__ import annotations

import copy
import functools
import time

import torch

from quantgate import modeling
from quantgate.measure import Timer


def prompt_ids(vocab_size: int, batch: int, length: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (batch, length), generator=generator).to(device)


@torch.no_grad()
def decode_eager(model, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """Prefill ms, decode ms per token and the greedy tokens, with a dynamic KV cache."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    with Timer(device) as prefill:
        token = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
    tokens = [token]
    with Timer(device) as decode:
        for _ in range(new_tokens - 1):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(token)
    return prefill.ms, decode.ms / (new_tokens - 1), torch.cat(tokens, 1)


@torch.no_grad()
def eager_choices(model, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Eager decoding's greedy choice at each position of `tokens`, given the prompt and the tokens before it: one
    forward over them all, as a speculative decoder checks a draft (a wrong token is caught where it is made, and one
    near-tie that parts does not make every later token differ)."""
    seen, n = torch.cat([ids, tokens[:, :-1]], 1), tokens.shape[1]
    # A row at a time: a whole batch's logits over a large vocabulary would be held at once.
    return torch.cat([model(input_ids=row[None], use_cache=False, logits_to_keep=n).logits[:, -n:].argmax(-1)
                      for row in seen])


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"{type(model).__name__}: no decoder layers to compile one at a time")
    # A forward set on the layer itself (accelerate's hooks wrap it so) would be bypassed, then deleted.
    if any("forward" in vars(layer) for layer in layers):
        raise TypeError(f"{type(model).__name__}: its decoder layers' forward is wrapped (hooks)")
    return layers


class LayerCache:
    """One layer's part of a cache, handed to that layer alone: the layer's index, by which a cache is
    read, then never reaches the traced code, so layers of one type share one compiled graph."""

    def __init__(self, part):
        self.part = part

    def update(self, keys, values, layer_idx, *args, **kwargs):
        return self.part.update(keys, values, *args, **kwargs)


def layer_forward(layer, cache: LayerCache, *args, past_key_values=None, **kwargs):
    return type(layer).forward(layer, *args, past_key_values=cache, **kwargs)


class StaticDecoder:
    """Greedy decoding from a static KV cache. On a GPU one decode step is captured in a CUDA graph
    (compiled first, when asked) and replayed per token: the step writes the next token and position
    into its own input buffers, so a replay needs nothing from the host. compile_scope layers compiles
    one decoder layer per layer type and runs the rest eagerly inside the same graph; model compiles the
    whole step as one graph (the 48 layers of a 12B model unrolled)."""

    def __init__(self, model, batch: int, max_len: int, compiled: bool = False, graph: bool = True,
                 compile_mode: str = "default", coordinate_descent: bool = False, compile_scope: str = "layers",
                 autotune_pointwise: bool = False):
        from transformers import StaticCache

        self.model = model
        # Every layer gets a full-length static cache: the model's sliding-window layers then mask
        # by position, and no Python-side counter (which a graph would freeze) decides anything.
        config = copy.copy(model.config.get_text_config(decoder=True))
        config.layer_types = ["full_attention"] * config.num_hidden_layers
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        device = modeling.model_device(model)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        if compiled:
            import torch._inductor.config as inductor

            inductor.coordinate_descent_tuning = coordinate_descent  # tunes the fused reductions (norms, argmax)
            inductor.triton.autotune_pointwise = autotune_pointwise  # times several configs per pointwise kernel
            if compile_scope == "layers":
                layer_step = torch.compile(layer_forward, fullgraph=True, dynamic=False, mode=compile_mode)
                self.layer_forwards = [(layer, functools.partial(layer_step, layer, LayerCache(part)))
                                       for layer, part in zip(decoder_layers(model), self.cache.layers, strict=True)]
                self.step = self._step_by_layer
            else:
                self.step = torch.compile(self._step, fullgraph=True, dynamic=False, mode=compile_mode)
        else:
            self.step = self._step
        self.graph, self.compile_s = None, None
        if graph:
            self._warm_and_capture()

    @torch.no_grad()
    def _step(self) -> None:
        logits = self.model(input_ids=self.token, position_ids=self.position[None].expand(self.token.shape[0], -1),
                            cache_position=self.position, past_key_values=self.cache, use_cache=True).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.add_(1)

    def _step_by_layer(self) -> None:
        # For this step only (the prefill stays eager), each decoder layer runs through the one compiled
        # function with its own part of the cache.
        for layer, forward in self.layer_forwards:
            layer.forward = forward
        try:
            self._step()
        finally:
            for layer, _ in self.layer_forwards:
                del layer.forward

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor) -> None:
        self.cache.reset()
        length = ids.shape[1]
        positions = torch.arange(length, device=ids.device)
        logits = self.model(input_ids=ids, position_ids=positions[None].expand(ids.shape[0], -1),
                            cache_position=positions, past_key_values=self.cache, use_cache=True,
                            logits_to_keep=1).logits
        self.token.copy_(logits[:, -1:].argmax(-1))
        self.position.fill_(length)

    def _warm_and_capture(self) -> None:
        # The cache's tensors are allocated by the first forward; warm up (and compile) on a side
        # stream, as CUDA-graph capture requires, then capture one step.
        self.prefill(torch.zeros(self.token.shape[0], 1, dtype=torch.long, device=self.token.device))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        self.compile_s = round(time.perf_counter() - t0, 2)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    @torch.no_grad()
    def run(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, float, torch.Tensor]:
        device = ids.device
        with Timer(device) as prefill:
            self.prefill(ids)
        tokens = torch.empty(ids.shape[0], new_tokens, dtype=torch.long, device=device)
        tokens[:, :1] = self.token
        with Timer(device) as decode:
            for i in range(1, new_tokens):
                self.graph.replay() if self.graph is not None else self.step()
                tokens[:, i:i + 1] = self.token
        return prefill.ms, decode.ms / (new_tokens - 1), tokens


def decode_attention(choice: str, model=None):
    """math: torch's own SDPA formula, which torch.compile fuses into a few Triton kernels; for one
    query over a short static cache that beats the fused attention kernels, which (cuDNN's) also
    need the mask written out per layer. gqa: quantgate.bench.attention's, the grouped KV heads read as they are
    (set on `model` while the step is traced). auto: torch's choice. Otherwise SDPBackend names, comma-separated."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if choice == "auto":
        return nullcontext()
    if choice == "gqa":
        from quantgate.bench.attention import gqa_decoding

        if model is None:
            raise ValueError("decode_attention gqa is set on the model: pass it")
        return gqa_decoding(model)
    return sdpa_kernel([getattr(SDPBackend, name.strip().upper()) for name in choice.split(",")])


COMPILE_LABELS = {"layers": "torch.compile per layer", "model": "torch.compile", None: "eager"}


FALLBACKS = ("layers", "model", None)  # the compile scopes tried, from the configured one on
