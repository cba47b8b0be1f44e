"""Benchmark step: memory and latency of the reference and of each recipe's saved checkpoint (what ships), each in
a process of its own (quantgate.bench); for a recipe whose library quantizes while loading, also the memory of loading
the reference checkpoint quantized on the fly (the "load a bf16 checkpoint in 4-bit" case).

Memory is sampled while the model loads (and quantizes) and while it generates: host private memory (RssAnon) and
file-backed pages (RssFile, the memory-mapped checkpoint) apart, because a 4-bit load that "spikes RAM to 24 GB" is
usually mapped file pages, not a private copy; GPU peaks allocated and reserved; the real bytes of the weights.
Latency is batch 1, 256 prompt tokens and 256 new ones by default: prefill, then greedy decode."""
from __future__ import annotations

import contextlib
from pathlib import Path

from quantgate import modeling
from quantgate.backends import RecipeBase, backend_of
from quantgate.bench.launcher import Beside, measured_in_processes, prepare_standby, run_measurement
from quantgate.bench.worker import Spec, largest_shard, weight_bytes
from quantgate.loading import cuda_skip
from quantgate.plan import MEMORY_SPARE, free_memory
from quantgate.results import Benchmarked
from quantgate.settings import BenchmarkSettings


def benchmark(name: str, checkpoint: str, recipe: RecipeBase | None, dtype: str, device: str | dict,
              settings: BenchmarkSettings, out_dir: str, reference: Benchmarked | None = None,
              base_checkpoint: str | None = None, cache_dir: str | None = None,
              adapters_served: dict[str, str] | None = None, alone=None) -> Benchmarked:
    """Measure one model in processes of its own: the reference (recipe None) or a recipe's saved checkpoint, what
    ships. Where the recipe's backend quantizes while loading and `base_checkpoint` is given, the reference
    quantized while loading is measured too (`quantize_on_load`). A process that dies (out of memory, a load that
    fails under a memory limit) becomes a record with its error. Inductor's compiled kernels are kept in
    `cache_dir`/inductor, so a model compiled once compiles again in a fraction of the time on the next run.
    `adapters_served` (name: folder): each measured again with the adapter on top, against the model without it.
    `reference`: the reference's benchmark, whose copy bandwidth this one's floor takes and which it is compared with
    (`compared`); without it, the bandwidth is measured here.
    `alone()`, where given, is a context in which the device is the step's alone (an orchestrator's turn): each
    process loads and compiles sharing the device, and times (or searches the KV cache's capacity) inside it; the
    memory of quantizing while loading, which times nothing, is measured beside the first load and compile where
    there is room for both (room_beside), and ends before the first turn is asked for. Otherwise, and without
    `alone`, it is measured after the others, so that nothing shares the host while they time."""
    if recipe is not None and (skipped := cuda_skip(recipe, modeling.resolve_device(device))):
        return Benchmarked(**skipped)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = Spec(checkpoint=checkpoint, recipe=recipe and recipe.model_dump(mode="json"), dtype=dtype, device=device,
                settings=settings, out_dir=str(out), copy_bandwidth=reference and reference.copy_bandwidth,
                mode="reference" if recipe is None else "saved",
                inductor_cache=str(Path(cache_dir) / "inductor") if cache_dir else None)
    on_load = None
    if base_checkpoint and settings.quantize_on_load and quantizes_while_loading(recipe):
        beside = bool(alone) and room_beside(checkpoint, base_checkpoint, device, settings)
        on_load_spec = spec.model_copy(update={"checkpoint": base_checkpoint, "latency": False,
                                               "mode": "quantize_on_load"})
        on_load = Beside(f"{name} (quantize on load)", on_load_spec, out / "benchmark-quantize-on-load.json", beside)
    with on_load or contextlib.nullcontext():
        result = measured_in_processes(name, spec, out, settings.processes, on_load.before(alone) if on_load else alone)
    if result["status"] != "ok":
        return Benchmarked(**result)
    warnings = list(result["diagnostics"]) + latency_warnings(result)
    if settings.memory_budget:
        result["kv_cache"] = kv_cache = run_measurement(name, spec.model_copy(update={"measure": "kv_cache"}),
                                                        out / "benchmark-kv-cache.json", alone=alone)
        warnings += kv_cache_warnings(kv_cache)
    for adapter, folder in (adapters_served or {}).items():
        result.setdefault("adapters", {})[adapter] = with_adapter(name, spec, adapter, folder, result, out, alone)
        warnings += [f"adapter {adapter}: {w}" for w in adapter_warnings(result["adapters"][adapter])]
    if on_load:
        result["quantize_on_load"] = found = on_load.result()
        warnings += [f"quantize on load: {d}" for d in found.get("diagnostics", [])]
        if found["status"] != "ok":
            warnings.append(f"quantize on load: {found['reason']}")
    return compared(Benchmarked(**{**result, "warnings": warnings}), reference)


def prepare() -> None:
    """Where measurement processes start in standbys (a host with CUDA, where none is forked), the first ones started
    now: a run calls this once its download has ended, so that the first benchmark finds its interpreters' imports
    done."""
    prepare_standby()


def with_adapter(name: str, spec: Spec, adapter: str, folder: str, without: dict, out: Path, alone=None) -> dict:
    """The model with a served adapter on top, in a process of its own: its memory and latency, and the decode time
    and private memory it adds to the model's own figures of this step."""
    found = run_measurement(f"{name} with {adapter}", spec.model_copy(update={"adapter": folder}),
                            out / f"benchmark-adapter-{adapter}.json", alone=alone)
    if found["status"] != "ok":
        return found
    mine, theirs = found["latency"]["decode_ms_per_token"], without["latency"]["decode_ms_per_token"]
    found["decode_ms_added"] = round(mine - theirs, 4)
    found["decode_ratio"] = round(mine / theirs, 4)
    found["real_bytes_added"] = found["real_bytes"] - without["real_bytes"]
    return found


def adapter_warnings(found: dict) -> list[str]:
    if found["status"] != "ok":
        return [found["reason"]]
    return latency_warnings(found)


# The least share of the fast path's tokens that eager decoding picks too, each given the tokens before it: a right path
# reads near 1 (a near-tie that parts costs one token), a path that goes wrong late many.
MIN_AGREEMENT = 0.9


def latency_warnings(result: dict) -> list[str]:
    """Why the latency figure does not stand for serving, and a fast path whose tokens disagree with eager's."""
    warnings = []
    if result.get("latency_caveat"):
        result["latency"]["representative_of_serving"] = False
        warnings.append(f"latency: {result['latency_caveat']}")
    if result["latency"].get("comparable") is False:
        warnings.append(f"latency: other processes kept {result['latency']['other_busy_cores']:.1f} CPU cores busy "
                        "while it was measured: the machine was shared, and the figure is not comparable with "
                        "another run's")
    for run in result["latency"]["runs"]:
        if run.get("greedy_agreement_with_eager") is not None and run["greedy_agreement_with_eager"] < MIN_AGREEMENT:
            warnings.append(f"batch {run['batch_size']}: the fast path's greedy tokens agree with eager decoding on "
                            f"only {run['greedy_agreement_with_eager']:.0%} of {run['new_tokens']}, parting at "
                            f"token {run['first_divergence_from_eager']}")
    return warnings


def kv_cache_warnings(kv_cache: dict) -> list[str]:
    if kv_cache["status"] != "ok":
        return [f"KV cache: {kv_cache['reason']}"]
    ratio = kv_cache.get("bytes_per_token_ratio")
    if ratio is not None and not 0.85 <= ratio <= 1.15:
        return [f"KV cache: each token of context took {kv_cache['bytes_per_token_measured']:,} bytes, the config "
                f"says {kv_cache['bytes_per_token_config']:,} ({ratio:.2f}x)"]
    return []


PROCESS_BYTES = 1_500_000_000  # a measurement process's own: a CUDA context, compiled kernels and graphs, the cache


def room_beside(checkpoint: str, base_checkpoint: str, device: str | dict, settings: BenchmarkSettings) -> bool:
    """Whether quantizing the reference while loading fits beside the recipe's own load: one device, no memory
    limits set, and free memory for both quantized models, the largest shard the reference loads through and each
    process's own."""
    if settings.max_memory or settings.offload_to_disk or isinstance(device, dict):
        return False
    needed = MEMORY_SPARE * (2 * weight_bytes(checkpoint) + largest_shard(Path(base_checkpoint))) + 2 * PROCESS_BYTES
    return needed <= free_memory(modeling.resolve_device(device))


def quantizes_while_loading(recipe: RecipeBase | None) -> bool:
    return recipe is not None and backend_of(recipe).load_config(recipe, []) is not None


def compared(benchmarked: Benchmarked, reference: Benchmarked | None) -> Benchmarked:
    """The benchmark with its speedup over the reference and its GPU peak's reduction, where both ended ok: at the
    step's end, or after it for one measured before the reference's benchmark had ended."""
    if not (benchmarked.ok and reference and reference.latency):
        return benchmarked
    result = {"latency": dict(benchmarked.latency), "memory": dict(benchmarked.memory)}
    compare_with_reference(result, reference)
    return benchmarked.model_copy(update=result)  # the fields the step set, and no others, stay set


def compare_with_reference(result: dict, reference: Benchmarked) -> None:
    """Adds the speedup over the reference, and the GPU peak's reduction, to a recipe's result."""
    result["latency"]["speedup_vs_reference"] = round(
        reference.latency["decode_ms_per_token"] / result["latency"]["decode_ms_per_token"], 3)
    # GPU peaks compare; host peaks of two processes differ by the libraries each imported.
    if reference.memory["gpu_peak_infer"] and result["memory"]["gpu_peak_infer"]:
        result["memory"]["peak_reduction_vs_reference"] = round(
            1 - result["memory"]["gpu_peak_infer"] / reference.memory["gpu_peak_infer"], 4)
