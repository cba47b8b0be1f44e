"""What docs/BENCHMARKS.md reports from the GPU: the quantize step's real functions on CUDA.

The steps are plain functions (Prefect wraps them only in flows/), called here as the flow calls
them. Usage (see run_on_gpu.sh):
  python docs/gpu/quantize_on_gpu.py smollm2 GGUF_PATH RECIPE...
  python docs/gpu/quantize_on_gpu.py gemma3-12b-shaped CKPT_DIR RECIPE...
With VALIDATE=1 the reference is measured once (and the scan's cost against a plain forward over
the prompt set), and each quantized recipe is validated against it. With EVALUATE=1 the reference
and each recipe run the evaluate step: all 14,042 MMLU questions 0-shot and all of WikiText-2.
"""
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from quantgate import drift, modeling, prompts as validation_prompts  # noqa: E402
from quantgate.backends import RecipeBase, parse_recipe  # noqa: E402
from quantgate.config import load_config  # noqa: E402
from quantgate.evaluations import lmeval  # noqa: E402
from quantgate.results import ReferenceEvaluation, ReferenceValidation  # noqa: E402
from quantgate.settings import ValidateSettings  # noqa: E402
from tasks import quantize as step  # noqa: E402
from tasks import evaluate as evaluation  # noqa: E402
from tasks import validate as validation  # noqa: E402
from tasks.download import download  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("DEVICE", "cuda")  # DEVICE=cpu LAYERS=1: a dry run of this script on a CPU


def recipe(name: str) -> RecipeBase:
    """A recipe of configs/recipes by name; `given:PATH` is a checkpoint candidate (a folder made earlier)."""
    if name.startswith("given:"):
        return parse_recipe({"method": "checkpoint", "name": "given-" + Path(name[6:]).parent.name, "source": name[6:],
                             "thresholds": load_config(ROOT / "configs" / "default.yaml",
                                                       ["recipes=[torchao-int4-weight-only]"])
                             .recipes[0].thresholds.model_dump()})
    return load_config(ROOT / "configs" / "default.yaml", [f"recipes=[{name}]"]).recipes[0]


def make_gemma3_12b_shaped(folder: Path) -> None:
    """Random bf16 weights in Gemma 3 12B's text shapes (as shared/gpu/load_probe.py builds it)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=int(os.environ.get("LAYERS", 48)),
                              num_attention_heads=16, num_key_value_heads=8, head_dim=256, sliding_window=1024,
                              query_pre_attn_scalar=256, max_position_embeddings=4096)
    config.architectures = ["Gemma3ForCausalLM"]
    t0 = time.time()
    torch.manual_seed(0)  # the same weights on every machine, so runs on different machines compare
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        model = Gemma3ForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(folder, max_shard_size="5GB")
    # Gemma 3's tokenizer is not needed for shapes; SmolLM2's stands in so the step can tokenize.
    del model
    torch.cuda.empty_cache()
    print(json.dumps({"made": str(folder), "seconds": round(time.time() - t0, 1)}), flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def measure_reference(model, checkpoint: str, key: str) -> dict:
    """The reference's validation measurements, and what the non-finite scan costs: the median of 3
    passes over the prompt set, plain forward against forward_scanned (hooks + hidden states)."""
    from statistics import median

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = [drift.encode(tokenizer, p).to(DEVICE) for p in validation_prompts.read()]

    def timed(fn) -> float:
        times = []
        for _ in range(4):  # the first pass warms up
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in ids:
                    fn(x)
            sync()
            times.append(time.perf_counter() - t0)
        return median(times[1:])

    # REFERENCE_TIMING=0: the reference's statistics alone, without timing the scan against a plain forward.
    timing = os.environ.get("REFERENCE_TIMING", "1") != "0"
    plain = timed(lambda x: model(input_ids=x)) if timing else float("nan")
    scanned = timed(lambda x: drift.forward_scanned(model, x)) if timing else float("nan")
    t0 = time.perf_counter()
    stats = drift.reference_stats(model, tokenizer, key, "bfloat16", Path("/tmp/qg-cache"), ValidateSettings())
    print(json.dumps({"prompts": len(ids), "tokens": sum(x.shape[1] for x in ids), "plain_forward_s": round(plain, 4),
                      "scanned_forward_s": round(scanned, 4), "scan_overhead": round(scanned / plain, 3),
                      "reference_measure_s": round(time.perf_counter() - t0, 1),
                      "reference_first_nonfinite": stats["first_nonfinite_module"]}), flush=True)
    return stats


def full_eval_settings():
    from quantgate.settings import EvaluateSettings

    if os.environ.get("QUICK"):  # a dry run of this script: 1 question a subject, 1 document
        return EvaluateSettings(limit=1, batch_size=8, wikitext_token_budget=256)
    return EvaluateSettings(limit=None, num_fewshot=0, wikitext_token_budget=None)


FULL_EVAL = full_eval_settings()


def evaluate_reference(model, checkpoint: str, key: str) -> dict:
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    result = lmeval.reference_evaluation(model, AutoTokenizer.from_pretrained(checkpoint), key, "bfloat16",
                                         Path("/tmp/qg-cache"), FULL_EVAL)
    print(json.dumps({"reference_evaluate": {"mmlu": {k: v for k, v in result["mmlu"].items() if k != "subjects"},
                                             "wikitext": result.get("wikitext"),
                                             "seconds": round(time.perf_counter() - t0, 1)}}), flush=True)
    return result


def main() -> None:
    which, path, names = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                      "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE}), flush=True)
    if path.suffix == ".gguf":  # smollm2, gemma3-270m: converted as the download step does
        t0 = time.time()
        fetched = download(f"gguf:{path}", None, "/tmp/qg-cache", "bfloat16")
        # The reference caches are keyed by the checkpoint's hash, as in the flow.
        checkpoint, key = fetched.checkpoint, fetched.checkpoint_sha256
        print(json.dumps({"converted": checkpoint, "seconds": round(time.time() - t0, 1)}), flush=True)
    else:
        checkpoint, key = str(path), path.name  # built on this machine; its caches live as long as it does
        if not (path / "config.json").is_file():
            make_gemma3_12b_shaped(path)
        # No Gemma tokenizer travels: SmolLM2's (49,152 ids, all inside Gemma's vocabulary) stands in.
        for f in Path(os.environ.get("TOKENIZER_DIR", "/tmp/qg-cache")).rglob("tokenizer*.json"):
            shutil.copy(f, path / f.name)
    model = modeling.load(checkpoint, "bfloat16", DEVICE)
    reference = modeling.real_bytes(model)
    print(json.dumps({"reference_real_bytes": reference}), flush=True)
    if os.environ.get("VALIDATE"):
        ref_stats = measure_reference(model, checkpoint, key)
    if os.environ.get("EVALUATE"):
        ref_eval = evaluate_reference(model, checkpoint, key)
    del model
    torch.cuda.empty_cache()
    for name in names:
        out = Path("/tmp/qg-out") / which / name.replace("/", "_").replace(":", "_")
        t0 = time.time()
        try:
            result = step.quantize(checkpoint, recipe(name), "bfloat16", DEVICE, str(out), 0.95,
                                   "/tmp/qg-cache").record()
        except Exception as e:  # the flow records these the same way
            result = {"status": "error", "reason": f"{type(e).__name__}: {str(e)[:400]}"}
        result["seconds"] = round(time.time() - t0, 1)
        if os.environ.get("VALIDATE") and result["status"] == "ok":
            t1 = time.time()
            checked = validation.validate(result["checkpoint"], recipe(name), ReferenceValidation(**ref_stats), DEVICE,
                                          ValidateSettings())
            result["validate"] = {k: getattr(checked, k, None) for k in (
                "verdict", "reasons", "first_nonfinite_module", "kl_mean", "kl_p99", "top1_agreement", "top5_overlap",
                "tokens", "max_divergence_layer", "kernel", "compute_dtype")}
            result["validate"]["seconds"] = round(time.time() - t1, 1)
        if os.environ.get("EVALUATE") and result["status"] == "ok":
            t1 = time.time()
            scored = evaluation.evaluate(result["checkpoint"], recipe(name), ReferenceEvaluation(**ref_eval), DEVICE,
                                         FULL_EVAL, str(out))
            result["evaluate"] = {"mmlu": {k: v for k, v in scored.mmlu.items() if k != "subjects"},
                                  "wikitext": getattr(scored, "wikitext", None), "seconds": round(time.time() - t1, 1)}
        if "real_bytes" in result:
            result["of_reference"] = round(result["real_bytes"] / reference, 4)
        result.pop("checkpoint", None)
        print(json.dumps({"model": which, "recipe": name, **result}), flush=True)
        if not os.environ.get("KEEP"):  # KEEP=1: the checkpoints stay, for a later candidate (given:PATH)
            shutil.rmtree(out, ignore_errors=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
