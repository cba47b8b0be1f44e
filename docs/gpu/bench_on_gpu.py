"""The benchmark step on the GPU, as docs/BENCHMARKS.md reports it: each model in its own process,
through the benchmark's own measure() (quantgate.bench.worker).
  python docs/gpu/bench_on_gpu.py CKPT_DIR reference RECIPE...   (prints one JSON line per model)
  python docs/gpu/bench_on_gpu.py child SPEC OUT                  (what each process runs)
  python docs/gpu/bench_on_gpu.py make CKPT_DIR                   (the Gemma-3-12B-shaped checkpoint)
  python docs/gpu/bench_on_gpu.py quantize CKPT_DIR RECIPE OUT    (the quantize step, its record on one line)
  python docs/gpu/bench_on_gpu.py capacity CKPT_DIR reference RECIPE...  (KV-cache capacity under BUDGET, default
      12GiB, per cache in CACHES; each recipe's saved checkpoint made first by the quantize step)
Settings from the environment: PROMPT, NEW, REPEATS, BATCHES (e.g. "1 8"), MAX_MEMORY (JSON), BENCH_DIR, CD (1, as
every figure before issue 19 was measured: inductor's coordinate-descent tuning on; 0: off, the step's default now),
AUTOTUNE_POINTWISE (0, the step's default; 1: inductor times several configs per pointwise kernel, as every figure
before that setting was measured), SCOPE (layers, the step's default: one decoder layer compiled per layer type;
model: the whole step, as every figure before the flow's second H100 run was measured),
MODE: quantize_on_load (the default: the reference quantized while loading) or saved (the recipe's checkpoint
made first by the quantize step in a process of its own, in SAVED_DIR, then loaded as the flow's benchmark does).
TOKENIZER_DIR: tokenizer files copied into the checkpoint (the quantize step tokenizes)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from quantgate.backends import RecipeBase  # noqa: E402
from quantgate.bench.worker import Spec  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.results import Benchmarked  # noqa: E402
from quantgate.settings import BenchmarkSettings  # noqa: E402
from tasks.benchmark import compare_with_reference  # noqa: E402


def settings() -> BenchmarkSettings:
    env = os.environ
    return BenchmarkSettings(prompt_tokens=int(env.get("PROMPT", 256)), new_tokens=int(env.get("NEW", 256)),
                             repeats=int(env.get("REPEATS", 5)),
                             batch_sizes=[int(b) for b in env.get("BATCHES", "1").split()],
                             compile_mode=env.get("COMPILE_MODE", "default"), compile_scope=env.get("SCOPE", "layers"),
                             coordinate_descent=env.get("CD", "1") == "1",
                             autotune_pointwise=env.get("AUTOTUNE_POINTWISE", "0") == "1",
                             decode_attention=env.get("ATTENTION", BenchmarkSettings().decode_attention),
                             max_memory=json.loads(env["MAX_MEMORY"]) if env.get("MAX_MEMORY") else None)


def summary(name: str, r: dict) -> dict:
    lat, mem = r["latency"], r["memory"]
    gb = lambda n: round(n / 1e9, 3) if n is not None else None  # noqa: E731
    return {"model": name, "load_s": r["load_s"], "real_gb": gb(r["real_bytes"]), "real_gb_at_load": gb(r.get("real_bytes_at_load")),
            "read_per_token_gb": gb(r["weight_bytes_per_token"]), "copy_bw_gb_s": round(r["copy_bandwidth"] / 1e9, 1),
            "host_private_peak_gb": gb(mem["host_private_peak"]), "host_file_peak_gb": gb(mem["host_file_peak"]),
            "host_hwm_gb": gb(mem["host_peak_incl_file_pages"]), "gpu_peak_load_gb": gb(mem["gpu_peak_load"]),
            "gpu_reserved_load_gb": gb(mem["gpu_reserved_peak_load"]), "gpu_peak_infer_gb": gb(mem["gpu_peak_infer"]),
            "hf_device_map": r["placement"]["hf_device_map_present"], "diagnostics": r["diagnostics"],
            "projections": lat.get("projections"),
            "runs": [{k: run.get(k) for k in ("batch_size", "path", "prefill_ms", "decode_ms_per_token", "tokens_per_s",
                                               "total_s", "bandwidth_floor_ms", "of_bandwidth_floor", "compile_s",
                                               "greedy_agreement_with_eager", "fallback_reason", "decode_ms_all")}
                     for run in lat["runs"]]}


def recipe_of(name: str) -> RecipeBase:
    return load_config(ROOT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]


def saved(checkpoint: str, name: str) -> str:
    """The recipe's saved checkpoint (what ships), made once a machine by the quantize step in its own process."""
    out = Path(os.environ.get("SAVED_DIR", "/tmp/qg-out")) / name
    if not (out / "checkpoint" / "config.json").is_file():
        for f in Path(os.environ.get("TOKENIZER_DIR", "/nonexistent")).glob("tokenizer*.json"):
            shutil.copy(f, Path(checkpoint) / f.name)
        subprocess.check_call([sys.executable, __file__, "quantize", checkpoint, name, str(out)])
    return str(out / "checkpoint")


def quantize(checkpoint: str, name: str, out: str) -> None:
    from tasks.quantize import quantize as step

    t0 = time.time()
    result = step(checkpoint, recipe_of(name), "bfloat16", os.environ.get("DEVICE", "cuda"), out, 0.9)
    keys = ("status", "reason", "warnings", "real_bytes", "quantized_modules", "fallback_modules", "quantize_s",
            "save_s", "reload_s", "roundtrip")
    print(json.dumps({"quantized": name, "process_s": round(time.time() - t0, 1),
                      **{k: getattr(result, k, None) for k in keys}}), flush=True)
    if result.status != "ok":
        sys.exit(1)


def capacity(checkpoint: str, names: list[str]) -> None:
    """The benchmark's KV-cache measurement (mode kv_cache) for each model, in a process of its own."""
    env = os.environ
    out = Path(env.get("BENCH_DIR", "/tmp/bench-kv"))
    out.mkdir(parents=True, exist_ok=True)
    bench = BenchmarkSettings(memory_budget=env.get("BUDGET", "12GiB"), kv_cache={
        "caches": env.get("CACHES", "dynamic static offloaded quanto hqq fp8").split(),
        "prefill_chunk": int(env.get("CHUNK", 2048)), "max_context": int(env["MAX_CONTEXT"]) if env.get("MAX_CONTEXT") else None,
        "kl_prompt_tokens": int(env.get("KL_TOKENS", 4096))})
    for name in names:
        recipe = None if name == "reference" else recipe_of(name).model_dump(mode="json")
        spec = Spec(checkpoint=checkpoint if recipe is None else saved(checkpoint, name), recipe=recipe,
                    mode="reference" if recipe is None else "saved", dtype="bfloat16", device="cuda",
                    settings=bench, out_dir=str(out / name), measure="kv_cache")
        (out / f"{name}.kv-spec.json").write_text(spec.model_dump_json())
        t0 = time.time()
        code = subprocess.call([sys.executable, __file__, "child", str(out / f"{name}.kv-spec.json"),
                                str(out / f"{name}.kv.json")])
        result = json.loads((out / f"{name}.kv.json").read_text()) if code == 0 else {"error": f"exit code {code}"}
        print(json.dumps({"model": name, "process_s": round(time.time() - t0, 1), **result}), flush=True)


def main(checkpoint: str, names: list[str]) -> None:
    # BENCH_DIR outlives a device call while the machine stays warm: a reference measured by the
    # previous call on the same machine is read back, so a recipe's call still compares within one run.
    out = Path(os.environ.get("BENCH_DIR") or Path(os.environ.get("OUT", "/tmp")) / "bench")
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "reference.json"
    reference = json.loads(earlier.read_text()) if "reference" not in names and earlier.is_file() else None
    if reference:
        print(json.dumps({"reference": "measured earlier on this machine", "decode_ms_per_token":
                          reference["latency"]["decode_ms_per_token"]}), flush=True)
    for name in names:
        recipe = None if name == "reference" else recipe_of(name).model_dump(mode="json")
        mode = "reference" if recipe is None else os.environ.get("MODE", "quantize_on_load")
        try:
            loaded = saved(checkpoint, name) if mode == "saved" else checkpoint
        except subprocess.CalledProcessError as e:
            print(json.dumps({"model": name, "error": f"quantize: exit code {e.returncode}"}), flush=True)
            continue
        spec = Spec(checkpoint=loaded, recipe=recipe, mode=mode, dtype="bfloat16",
                    device=os.environ.get("DEVICE", "cuda"), settings=settings(), out_dir=str(out / name),
                    copy_bandwidth=reference and reference["copy_bandwidth"])
        (out / f"{name}.spec.json").write_text(spec.model_dump_json())
        t0 = time.time()
        code = subprocess.call([sys.executable, __file__, "child", str(out / f"{name}.spec.json"),
                                str(out / f"{name}.json")])
        if code != 0:
            print(json.dumps({"model": name, "error": f"exit code {code}", "s": round(time.time() - t0)}), flush=True)
            continue
        result = json.loads((out / f"{name}.json").read_text())
        if name == "reference":
            reference = result
        elif reference:
            compare_with_reference(result, Benchmarked(**reference))
        line = {**summary(name, result), "mode": mode}
        line["process_s"] = round(time.time() - t0, 1)
        if "speedup_vs_reference" in result["latency"]:
            line["speedup_vs_reference"] = result["latency"]["speedup_vs_reference"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        sys.path.insert(0, str(ROOT / "docs" / "gpu"))
        from quantize_on_gpu import make_gemma3_12b_shaped
        make_gemma3_12b_shaped(Path(sys.argv[2]))
    elif sys.argv[1] == "quantize":
        quantize(*sys.argv[2:5])
    elif sys.argv[1] == "capacity":
        capacity(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "child":
        from quantgate.bench.worker import main as child
        child(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2:])
