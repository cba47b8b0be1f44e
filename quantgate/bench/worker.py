"""One measurement in a process of its own (`python -m quantgate.bench.worker SPEC OUT`, or forked by
quantgate.bench.zygote): the model loaded as a user loads it, its memory sampled while it loads and while it
generates, its latency; or its KV-cache capacity under a memory budget. The spec and the result are JSON files."""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel

from quantgate import kvcache, modeling
from quantgate.backends import backend_of, fp8_kernel, parse_recipe
from quantgate.bench.decode import prompt_ids
from quantgate.bench.latency import measure_latency, weight_bytes_per_token
from quantgate.files import WEIGHT_FILES, write_json
from quantgate.loading import growth, kernel_of, load_quantized
from quantgate.measure import BUSY_CORES, MemorySampler, proc_status, process_age_s
from quantgate.paths import DATA_DIR
from quantgate.plan import kept, plan_recipe
from quantgate.settings import BenchmarkSettings

log = logging.getLogger("quantgate.benchmark")


class Spec(BaseModel):
    """What one measurement process measures, written as JSON by the launcher."""
    checkpoint: str
    recipe: dict | None = None  # a recipe's fields; None: the reference
    dtype: str
    device: str | dict
    settings: BenchmarkSettings
    out_dir: str
    copy_bandwidth: float | None = None  # the reference's, where measured before; None: measured here
    mode: Literal["reference", "saved", "quantize_on_load"] = "reference"
    inductor_cache: str | None = None
    latency: bool = True  # false: memory while loading only
    measure: Literal["latency", "kv_cache"] = "latency"
    adapter: str | None = None  # a served LoRA adapter's folder, loaded by peft on top of the model
    # (ready, go) files: the process waits, loaded and compiled, for the device to itself before it measures
    turn: tuple[str, str] | None = None

    @property
    def offload_folder(self) -> Path:
        """Where its weights offloaded to disk go, one folder a mode: quantize-on-load runs beside the others."""
        return Path(self.out_dir) / f"offload-{self.mode}"


def weight_file_sizes(checkpoint: str | Path) -> list[int]:
    return [p.stat().st_size for pattern in WEIGHT_FILES for p in Path(checkpoint).glob(pattern)]


def largest_shard(checkpoint: Path) -> int:
    return max(weight_file_sizes(checkpoint), default=0)


def weight_bytes(checkpoint: str | Path) -> int:
    return sum(weight_file_sizes(checkpoint))


def diagnose(memory: dict, real_bytes: int, shard: int, baseline_private: int) -> list[str]:
    """Plain-language findings about a load; empty when nothing is off."""
    found = []
    bound = real_bytes + shard
    load = memory["load"]
    private = load["host_private_peak"] - baseline_private
    if private > bound:
        found.append(f"quantized too late: host private memory grew {private / 1e9:.2f} GB during the load, more than "
                     f"the final weights ({real_bytes / 1e9:.2f} GB) plus the largest shard ({shard / 1e9:.2f} GB): "
                     f"a full-precision copy was held in RAM")
    if load["gpu_peak_allocated"] is not None and load["gpu_peak_allocated"] > bound:
        found.append(f"quantized too late: the GPU peak during the load ({load['gpu_peak_allocated'] / 1e9:.2f} GB) "
                     f"exceeds the final weights ({real_bytes / 1e9:.2f} GB) plus the largest shard "
                     f"({shard / 1e9:.2f} GB): the weights reached the GPU before they were quantized")
    if load["host_file_peak"] > 2 * max(load["host_private_peak"], 1):
        found.append(f"the host peak is mostly file-backed: {load['host_file_peak'] / 1e9:.2f} GB of memory-mapped "
                     f"checkpoint pages (the kernel drops them under pressure) against "
                     f"{load['host_private_peak'] / 1e9:.2f} GB private")
    return found


def limits_of(settings: BenchmarkSettings) -> dict:
    return {k: v for k in ("max_memory", "offload_to_disk") if (v := getattr(settings, k))}


def loader(spec: Spec):
    """A function that loads the model as a user does, with the spec's adapter on top where it names one."""
    load = model_loader(spec)
    if spec.adapter is None:
        return load
    from quantgate import adapters

    return lambda: adapters.attach(load(), Path(spec.adapter))


def model_loader(spec: Spec):
    """A function that loads the model as a user does: the reference, a recipe's saved checkpoint (mode `saved`),
    or the reference quantized while loading (mode `quantize_on_load`). Libraries are imported and the plan made
    here, so the load's samples hold the load alone."""
    from transformers import AutoConfig

    kwargs = {}
    if spec.settings.max_memory:
        kwargs["max_memory"] = {int(k) if str(k).isdigit() else k: v for k, v in spec.settings.max_memory.items()}
    if spec.settings.offload_to_disk:
        kwargs["offload_folder"] = str(spec.offload_folder)
    device = "auto" if kwargs else modeling.resolve_device(spec.device)
    config = AutoConfig.from_pretrained(spec.checkpoint)
    modeling.model_class(config)
    if spec.recipe is None:
        return lambda: modeling.load(spec.checkpoint, spec.dtype, device, **kwargs)
    recipe = parse_recipe(spec.recipe)
    backend = backend_of(recipe)
    for module in backend.imports:
        importlib.import_module(module)
    if spec.mode == "saved":
        return lambda: backend.load(Path(spec.checkpoint), device, spec.dtype, **kwargs)
    keep = kept(plan_recipe(modeling.skeleton(config), recipe))
    return lambda: load_quantized(spec.checkpoint, recipe, spec.dtype, device, keep, **kwargs)


def caveats(recipe) -> dict:
    """The kernel the recipe ran on and why its latency does not stand for serving, where its backend says."""
    why = backend_of(recipe).latency_caveat(recipe)
    return {**kernel_of(recipe), **({"latency_caveat": why} if why else {})}


def first_forward(model, device: torch.device) -> None:
    with torch.no_grad():
        model(input_ids=prompt_ids(model.config.get_text_config().vocab_size, 1, 8, device))


def measure(spec: Spec) -> dict:
    """Memory while loading, then (unless the spec says latency: false) memory and latency while generating."""
    t0 = time.perf_counter()
    load_model = loader(spec)  # first: the sampler's baseline holds the libraries it imports
    prepare_s = time.perf_counter() - t0
    sampler = MemorySampler(spec.settings.sample_interval_ms)
    try:
        t0 = time.perf_counter()
        with sampler.phase("load") as load:
            model = load_model()
        load_s = time.perf_counter() - t0
        at_load = modeling.real_bytes(model)
        shard = largest_shard(spec.checkpoint)
        diagnostics = diagnose({"load": load}, at_load, shard, sampler.baseline["RssAnon"])
        if not spec.latency:
            log.info("benchmark: loaded in %.1f s (libraries and plan %.1f s before)", load_s, prepare_s)
            return {"real_bytes": at_load, "load_s": round(load_s, 2), "prepare_s": round(prepare_s, 2),
                    "largest_shard": shard,
                    "memory": {**load, "host_private_baseline": sampler.baseline["RssAnon"]},
                    "diagnostics": diagnostics}
        inferred = generate_measured(model, spec, sampler, load_s, prepare_s)
        if grown := growth(at_load, inferred["real_bytes"], "model"):
            diagnostics.append(grown)
        return {"real_bytes_at_load": at_load, "load_s": round(load_s, 2), **inferred, "largest_shard": shard,
                "memory": memory_of_phases(sampler), "loaded": spec.checkpoint,
                **({"adapter": spec.adapter} if spec.adapter else {}),
                "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                **(caveats(parse_recipe(spec.recipe)) if spec.recipe else {}),
                "dtype": modeling.computed_dtype(model), "limits": limits_of(spec.settings), "diagnostics": diagnostics}
    finally:
        sampler.close()


def generate_measured(model, spec: Spec, sampler: MemorySampler, load_s: float, prepare_s: float) -> dict:
    """Latency, with the memory of generating sampled as the phase `infer`."""
    device = modeling.model_device(model)
    with sampler.phase("infer"):
        t0 = time.perf_counter()
        first_forward(model, device)
        forward_s = time.perf_counter() - t0
        real = modeling.real_bytes(model)  # what it runs in: a library may expand its weights on the first forward
        per_token = weight_bytes_per_token(model, real)
        log.info("benchmark: loaded in %.1f s (libraries and plan %.1f s before, first forward %.1f s after), real "
                 "bytes %.3f GB", load_s, prepare_s, forward_s, real / 1e9)
        latency = measure_latency(model, spec.settings, per_token, spec.copy_bandwidth, backend_for(spec),
                                  ready=spec.turn and (lambda: wait_for_turn(spec)))
    bandwidth = latency.pop("copy_bandwidth")
    if latency["other_busy_cores"] > BUSY_CORES:
        latency["comparable"] = False
    return {"real_bytes": real, "latency": latency, "copy_bandwidth": bandwidth, "weight_bytes_per_token": per_token,
            "prepare_s": round(prepare_s, 2), "first_forward_s": round(forward_s, 2),
            "placement": modeling.devices_of(model), "device": str(device), "cpu_threads": torch.get_num_threads()}


def wait_for_turn(spec: Spec) -> None:
    """Tells the launcher the model is ready to be measured, then waits for its go: the device to itself (the flow's
    turn, which may wait for other steps as long as they run); given up where the launcher is gone."""
    ready, go = map(Path, spec.turn)
    parent = os.getppid()
    ready.touch()
    while not go.exists():
        if os.getppid() != parent:
            raise RuntimeError("the process that started this measurement is gone")
        time.sleep(0.02)


def backend_for(spec: Spec):
    return backend_of(parse_recipe(spec.recipe)) if spec.recipe else None


def memory_of_phases(sampler: MemorySampler) -> dict:
    load, infer = sampler.peaks["load"], sampler.peaks["infer"]
    return {"host_private_peak": max(load["host_private_peak"], infer["host_private_peak"]),
            "host_file_peak": max(load["host_file_peak"], infer["host_file_peak"]),
            "host_private_baseline": sampler.baseline["RssAnon"], "host_peak_incl_file_pages": proc_status()["VmHWM"],
            "gpu_peak_load": load["gpu_peak_allocated"], "gpu_reserved_peak_load": load["gpu_peak_reserved"],
            "gpu_peak_infer": infer["gpu_peak_allocated"], "gpu_reserved_peak_infer": infer["gpu_peak_reserved"],
            "load": load, "infer": infer}


def long_prompt(checkpoint: str, tokens: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, str]:
    """The start of WikiText-2's test split in the checkpoint's tokenizer, or random ids where it has none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as e:
        log.info("benchmark: no tokenizer in %s (%s): random token ids", checkpoint, e)
        return prompt_ids(vocab, 1, tokens, device), "random token ids (the checkpoint has no tokenizer)"
    text = (DATA_DIR / "wikitext2" / "test.txt").read_text()
    # Generous: the text is cut before tokenizing, and some tokenizers take many characters a token.
    ids = tokenizer(text[: tokens * 40], return_tensors="pt").input_ids[:, :tokens]
    return ids.to(device), f"WikiText-2 test, its first {ids.shape[1]:,} tokens"


def measure_kv_cache(spec: Spec) -> dict:
    """The model loaded as for the benchmark, then its KV-cache capacity under the memory budget for each
    cache, and the quantized caches' KL on a long prompt."""
    settings, kv = spec.settings, spec.settings.kv_cache
    model = loader(spec)()
    if spec.turn:
        wait_for_turn(spec)
    spread = modeling.devices_of(model)["param_bytes_by_device"]  # offloaded weights count as a device
    if len(spread) > 1:
        return {"status": "not_run",
                "reason": f"the model spans {sorted(spread)}: the capacity is measured on one device"}
    text = model.config.get_text_config(decoder=True)
    limit = kv.max_context or text.max_position_embeddings
    t0 = time.perf_counter()
    result = kvcache.capacity(model, settings.memory_budget, kv.caches, kv.prefill_chunk, limit,
                              kv.decode_tokens, kv.bits)
    log.info("benchmark: KV-cache capacity in %.1f s: %s", time.perf_counter() - t0,
             {k: c.get("context_tokens", c["status"]) for k, c in result["caches"].items()})
    quantized = [k for k in kv.caches if k in kvcache.QUANTIZED]
    if quantized:
        fit = result["caches"].get("dynamic", {}).get("context_tokens") or limit  # the longest the budget allows
        ids, result["kl_prompt"] = long_prompt(spec.checkpoint, min(kv.kl_prompt_tokens or fit, fit), text.vocab_size,
                                               modeling.model_device(model))
        result["kl"] = kvcache.quantized_cache_kl(model, ids, quantized, kv.kl_chunk, kv.bits, kv.kl_flag)
    return {"status": "ok", **result}


STARTS = {"fresh": "began (its interpreter and imports)", "forked": "was forked (its imports the zygote's)",
          "standby": "was asked for (a standby: its imports done before, or waited for)"}


def main(spec_path: str, out_path: str, asked_at: float | None = None, how: str = "fresh") -> None:
    """`how` it started (STARTS); `asked_at`: when a standby was asked for this measurement (time.monotonic)."""
    # first: since the process began, or since the standby was asked (its imports done, or their end waited for)
    up_s = process_age_s() if asked_at is None else time.monotonic() - asked_at
    # force: importing Prefect gave the root its own handler and WARNING, which dropped these lines
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    log.info("benchmark: process up %.1f s after it %s", up_s, STARTS[how])
    spec = Spec.model_validate_json(Path(spec_path).read_text())
    fp8_kernel.keep_bytes = 0  # the model's memory is measured here: no float32 copies of FP8 weights
    result = measure_kv_cache(spec) if spec.measure == "kv_cache" else measure(spec)
    write_json(Path(out_path), {**result, "process_up_s": round(up_s, 2)})


if __name__ == "__main__":
    main(*sys.argv[1:3])
