"""Loading models and measuring them: shared by the steps in tasks/."""
from __future__ import annotations

import logging
import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

log = logging.getLogger("quantgate")

# Fixed texts for quick logit comparisons (round trips): prose, code, numbers, chat.
PROBE_TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; the trip took about 3 days and",
    "User: Give me three tips for sleeping better.\nAssistant: 1. Keep a regular schedule. 2.",
]


def resolve_device(device: str | dict) -> str | dict:
    """What from_pretrained's device_map gets: cpu, cuda, or a placement over several GPUs (see placement)."""
    if isinstance(device, dict):  # JSON turned its GPU numbers into strings
        return {"device_map": device["device_map"],
                "max_memory": {int(k) if str(k).isdigit() else k: v for k, v in device["max_memory"].items()}}
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the config asks for device: cuda, and this machine has no CUDA device")
    return device


def placement(device: str | list[int], max_memory: dict | None = None, gpus: int | None = None) -> str | dict:
    """model.device and model.max_memory as the steps load with them: `cpu`, `cuda` (one GPU, as before), or
    {device_map: auto, max_memory: {gpu: limit, ...}} to spread a model over several GPUs of this host."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if device == "cpu" or (device == "auto" and gpus == 0):
        return "cpu"
    if gpus == 0:
        raise RuntimeError(f"the config asks for device: {device}, and this machine has no CUDA device")
    chosen = list(range(gpus)) if device == "auto" else [0] if device == "cuda" else list(device)
    if missing := [g for g in chosen if g >= gpus]:
        raise RuntimeError(f"the config asks for GPUs {chosen}; this machine has {gpus} (no GPU {missing[0]})")
    limits = dict(max_memory or {})
    if stray := [g for g in limits if g != "cpu" and g not in chosen]:
        raise RuntimeError(f"model.max_memory limits GPU {stray[0]}, which model.device {device} does not use")
    if len(chosen) == 1 and not limits:
        return "cuda" if chosen == [0] else f"cuda:{chosen[0]}"
    # A GPU without a limit offers its total memory less 10% for activations and the KV cache.
    return {"device_map": "auto", "max_memory": {
        **{g: limits.get(g) or f"{int(torch.cuda.get_device_properties(g).total_memory * 0.9)}B" for g in chosen},
        **({"cpu": limits["cpu"]} if "cpu" in limits else {})}}


def devices_used(placement: str | dict) -> list[str]:
    """The physical devices a placement computes on, named the same from any process or host: each GPU by its UUID
    (CUDA_VISIBLE_DEVICES renumbers them per process), the CPU by its host."""
    import socket

    if placement == "cpu":
        return [f"cpu-{socket.gethostname()}"]
    if isinstance(placement, str):
        return [f"gpu-{torch.cuda.get_device_properties(torch.device(placement).index or 0).uuid}"]
    return [f"gpu-{torch.cuda.get_device_properties(g).uuid}" for g in sorted(k for k in placement["max_memory"] if k != "cpu")]


def single_device(device: str | dict) -> str:
    """One device for a library whose loader takes one (hqq, quanto): the first GPU of a placement."""
    if isinstance(device, str):
        return device
    return f"cuda:{min(k for k in device['max_memory'] if k != 'cpu')}"


def planned_device_map(model: torch.nn.Module, max_memory: dict, dtype: torch.dtype) -> dict[str, str]:
    """Where accelerate would put each block of a model (a meta-device skeleton will do) under these limits."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    # transformers' own functions, as from_pretrained(device_map="auto") calls them: balanced over the GPUs first.
    model = model.to(dtype)  # in place, on the meta device: the sizes change, nothing is allocated
    blocks = getattr(model, "_no_split_modules", None) or []
    balanced = get_balanced_memory(model, max_memory=dict(max_memory), no_split_module_classes=blocks)
    return infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=blocks)


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a loaded model computes: its (first) GPU, else the CPU."""
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    return next((d for d in devices if d.type == "cuda"), torch.device("cpu"))


def devices_of(model: torch.nn.Module) -> dict:
    """Where the weights ended up: bytes per device (offloaded ones on `meta`), and modules per device."""
    by_device = Counter()
    for param in model.parameters():
        device = "offloaded" if param.device.type == "meta" else str(param.device)
        by_device[device] += param.numel() * param.element_size()
    device_map = getattr(model, "hf_device_map", None)
    return {"hf_device_map_present": device_map is not None, "param_bytes_by_device": dict(by_device),
            "modules_by_device": dict(Counter(str(v) for v in device_map.values())) if device_map else None}


# oneDNN ISAs (ONEDNN_MAX_CPU_ISA) at or above which bf16 matmuls run in hardware.
BF16_ISAS = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}


def native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls in hardware (AVX512-BF16 or AMX) and oneDNN may use them."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        return False
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split())) and cap in BF16_ISAS


def compute_dtype(checkpoint_dtype: str, device: str, requested: str = "auto") -> str:
    """The dtype models compute in: the checkpoint's, except on a CPU that would emulate bf16 or fp16
    in software, where float32 is faster (docs/BENCHMARKS.md); the checkpoint stays as it is."""
    if requested != "auto":
        return requested
    on_gpu = device != "cpu" and torch.cuda.is_available()
    if on_gpu or checkpoint_dtype == "float32" or (checkpoint_dtype == "bfloat16" and native_bf16()):
        return checkpoint_dtype
    return "float32"


def computed_dtype(model: torch.nn.Module) -> str:
    """The dtype a loaded model computes in: that of most of its plain floating weights, by size (a backend
    may keep its own; float8 weights are storage and their float32 block scales small, computed on in
    their layer's activation dtype)."""
    dtypes = Counter()
    for p in model.parameters():
        if p.is_floating_point() and p.element_size() > 1 and type(p.data) in (torch.Tensor, torch.nn.Parameter):
            dtypes[str(p.dtype).removeprefix("torch.")] += p.numel()
    return dtypes.most_common(1)[0][0] if dtypes else "unknown"


def model_class(config):
    """The transformers class a checkpoint was saved from (multimodal ones included)."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModelForCausalLM


def skeleton(config) -> torch.nn.Module:
    """The model's module tree on the meta device: names and shapes, no weights."""
    cls = model_class(config)
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config)
        return cls(config)


def load(checkpoint: str | Path, dtype: str, device: str, quantization_config=None, **load_kwargs) -> torch.nn.Module:
    """load_kwargs go to from_pretrained (max_memory, offload_folder for offloading)."""
    from transformers import AutoConfig

    cls = model_class(AutoConfig.from_pretrained(checkpoint))
    with timed(f"load {Path(checkpoint).name}"):
        where = {"device_map": device} if isinstance(device, str) else resolve_device(device)
        model = cls.from_pretrained(checkpoint, dtype=dtype if dtype == "auto" else getattr(torch, dtype),
                                    quantization_config=quantization_config, **{**where, **load_kwargs})
    return model.eval()


def real_bytes(model: torch.nn.Module, as_dtype: str | None = None) -> int:
    """Bytes the weights really take: the inner tensors of tensor subclasses (torchao, quanto)
    and bitsandbytes' quantization state, each storage once (tied weights). as_dtype counts plain
    floating parameters at that dtype's size: a model loaded to compute in float32, as its checkpoint holds it."""
    itemsize = getattr(torch, as_dtype).itemsize if as_dtype else None
    params = {p.data_ptr() for p in model.parameters()}  # buffers (rotary tables) keep their dtype either way
    seen, total = set(), 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if is_traceable_wrapper_subclass(t):
            names, _ = t.__tensor_flatten__()
            for name in names:
                inner = getattr(t, name)
                if inner is not None:
                    add(inner)
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device, storage.nbytes())
        if key not in seen:
            seen.add(key)
            plain = t.is_floating_point() and not low_precision(t) and t.data_ptr() in params  # FP8 stays FP8
            scale = itemsize / t.element_size() if itemsize and plain else 1
            total += round(storage.nbytes() * scale)

    # state_dict holds bitsandbytes' quantization state; buffers hold non-persistent ones (rotary).
    for tensor in [*model.state_dict().values(), *model.buffers()]:
        if isinstance(tensor, torch.Tensor):
            add(tensor.data if isinstance(tensor, torch.nn.Parameter) else tensor)
    return total


EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")


def is_experts(module: torch.nn.Module) -> bool:
    """A mixture-of-experts block that holds its experts' projections as 3-D tensors (not as Linear layers)."""
    return any(n in EXPERT_WEIGHTS and p.ndim == 3 for n, p in module.named_parameters(recurse=False))


def low_precision(t: torch.Tensor) -> bool:
    return is_traceable_wrapper_subclass(t) or t.dtype in (torch.int8, torch.uint8, torch.float8_e4m3fn)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a Linear-like module (or a block of 3-D expert weights) holds quantized weights, whichever
    library did it."""
    if is_experts(module):
        return any(low_precision(p) for p in module.parameters(recurse=False) if p.ndim == 3)
    weight = getattr(module, "weight", None)
    if type(module) is not torch.nn.Linear:
        return True  # replaced by the library's own class (Linear4bit, QLinear, FP8Linear...)
    return weight is not None and low_precision(weight)


def output_embedding(model: torch.nn.Module) -> torch.nn.Module | None:
    """The head, where the model has one."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def output_embedding_name(model: torch.nn.Module) -> str | None:
    out = output_embedding(model)
    return next((name for name, module in model.named_modules() if module is out), None) if out is not None else None


def tied_output_embedding(model: torch.nn.Module) -> bool:
    """Whether the output embedding (the head) shares its weight with the input embedding."""
    out = output_embedding(model)
    if out is None:
        return False
    head, emb = out.weight, model.get_input_embeddings().weight
    if head is emb:
        return True
    # A quantized head (a tensor subclass) has no storage of its own to compare, and on the meta device (a
    # skeleton, weights offloaded to disk) every data_ptr is 0: neither is tied unless it is the same tensor.
    plain = not (low_precision(head) or low_precision(emb)) and "meta" not in (head.device.type, emb.device.type)
    return plain and head.data_ptr() == emb.data_ptr()


def untie_output_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The head given a copy of its own of the input embedding's weight, and the configs told, so the head can be
    quantized alone and saved apart; returns the head."""
    head = model.get_output_embeddings()
    if head.weight.device.type == "meta":
        raise ValueError("the output embedding is offloaded (on the meta device): it cannot be untied and quantized")
    if tied_output_embedding(model):
        head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for config in {id(c): c for c in (model.config, model.config.get_text_config(decoder=True))}.values():
            config.tie_word_embeddings = False
        # transformers saves and reloads by this mapping, made when the model was built.
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return head


def held_as(module: torch.nn.Module) -> str:
    """What a Linear-like module holds its weight as: its class, and the weight's tensor class or dtype."""
    weight = next((p for p in module.parameters(recurse=False) if p.ndim == 3), None) if is_experts(module) \
        else getattr(module, "weight", None)
    if weight is None:
        return type(module).__name__
    held = type(weight).__name__ if is_traceable_wrapper_subclass(weight) else str(weight.dtype).removeprefix("torch.")
    return f"{type(module).__name__}: {held}"


@torch.no_grad()
def probe_logits(model: torch.nn.Module, tokenizer) -> list[torch.Tensor]:
    """Float32 logits of each probe text, on the CPU."""
    device = next(model.parameters()).device
    out = []
    for text in PROBE_TEXTS:
        ids = tokenizer(text, return_tensors="pt").to(device)
        out.append(model(**ids).logits[0].float().cpu())
    return out


def compare_logits(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict:
    a_all, b_all = torch.cat(a), torch.cat(b)
    finite = bool(torch.isfinite(b_all).all())
    return {"finite_before_saving": bool(torch.isfinite(a_all).all()),
            "max_abs_logit_diff": float((a_all - b_all).abs().max()) if finite else None,
            "top1_agreement": float((a_all.argmax(-1) == b_all.argmax(-1)).float().mean()),
            "identical": bool(torch.equal(a_all, b_all)), "finite": finite, "tokens": int(a_all.shape[0])}


def host_rss() -> int:
    return psutil.Process().memory_info().rss


@contextmanager
def timed(what: str):
    """Logs the seconds and the host/GPU memory a block took, where it was spent."""
    t0, rss0 = time.perf_counter(), host_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    yield
    gpu = f", GPU peak {torch.cuda.max_memory_allocated() / 1e9:.2f} GB" if torch.cuda.is_available() else ""
    log.info("%s: %.1f s, host RSS %+.2f GB%s", what, time.perf_counter() - t0, (host_rss() - rss0) / 1e9, gpu)
