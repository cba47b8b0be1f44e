"""Per-tower validation of a multimodal checkpoint: the text prompts never run its vision tower, so the
image prompts of data/multimodal do. For each image: what the tower hands the language model (the
projector's output embeddings, `get_image_features`), the next-token distribution on the image+question
prompt, a scan for non-finite outputs over every module, and the greedy answer; the reference's are
measured once and cached like its text statistics.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantgate import modeling
from quantgate.backends import ValidateThresholds
from quantgate.files import sha256_file

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "multimodal" / "prompts.jsonl"


def image_prompts(path: Path = PROMPTS) -> list[dict]:
    return [p for p in map(json.loads, path.read_text().splitlines()) if p["kind"] == "image"]


def vision_tower(model) -> str:
    return next(name for name, _ in model.named_modules() if name.endswith("vision_tower"))


def sees_images(model) -> bool:
    return hasattr(model, "get_image_features") and getattr(model.config, "vision_config", None) is not None


def image_inputs(processor, prompt: dict, device) -> dict:
    """The processor's inputs for one image and its question (the image token where the image goes)."""
    from PIL import Image

    image = Image.open(PROMPTS.parent / prompt["file"]).convert("RGB")
    return processor(text=f"{processor.image_token}\n{prompt['question']}", images=image, return_tensors="pt").to(device)


@torch.no_grad()
def measure(model, processor, max_new_tokens: int) -> dict:
    """Per image: the projected embeddings, the last position's logits, the non-finite modules, the answer."""
    from tasks.validate import NonFiniteScan

    dtype = getattr(torch, modeling.computed_dtype(model))
    device = next(model.parameters()).device
    measured = []
    for prompt in image_prompts():
        inputs = image_inputs(processor, prompt, device)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        features = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        with NonFiniteScan(model) as scan:
            logits = model(**inputs).logits[0, -1].float().cpu()
        answer = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        measured.append({"id": prompt["id"], "features": features.float().cpu().flatten(), "logits": logits,
                         "nonfinite": scan.flagged(), "answer": processor.decode(answer, skip_special_tokens=True)})
    return {"prompts": measured}


def cache_name() -> str:
    """The cache file's name, keyed by the prompt set (a changed prompt set is measured again)."""
    return f"towers-{sha256_file(PROMPTS)[:12]}.pt"


def reference_towers(model, processor, cache: Path, max_new_tokens: int) -> dict | None:
    """The reference's image measurements, cached at `cache` (a torch file of plain tensors)."""
    if not sees_images(model):
        return None
    if not cache.is_file():
        stats = measure(model, processor, max_new_tokens)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(stats, tmp)
        tmp.rename(cache)
    return {"path": str(cache), "prompts": len(image_prompts())}


def compare(model, processor, reference: dict, max_new_tokens: int) -> dict:
    """The vision tower's metrics against the reference's: embedding cosine, next-token KL and top-1, answers."""
    ref = torch.load(reference["path"], weights_only=True)["prompts"]
    mine = measure(model, processor, max_new_tokens)["prompts"]
    cosines, kls, top1, answers, nonfinite = [], [], [], [], []
    for r, m in zip(ref, mine):
        cosines.append(float(torch.nn.functional.cosine_similarity(r["features"], m["features"], dim=0)))
        p, q = torch.log_softmax(r["logits"], -1), torch.log_softmax(m["logits"], -1)
        kls.append(float((p.exp() * (p - q)).sum()))
        top1.append(float(r["logits"].argmax() == m["logits"].argmax()))
        answers.append({"prompt": r["id"], "reference": r["answer"], "quantized": m["answer"]})
        nonfinite += [name for name in m["nonfinite"] if name not in nonfinite]
    finite = [c for c in cosines if c == c]
    return {vision_tower(model): {"prompts": len(mine), "embedding_cosine_mean": sum(finite) / len(finite) if finite else None,
                     "embedding_cosine_min": min(finite) if finite else None, "kl_mean": sum(kls) / len(kls),
                     "top1_agreement": sum(top1) / len(top1), "first_nonfinite_module": nonfinite[0] if nonfinite else None,
                     "answers": answers}}


def verdicts(towers: dict, t: ValidateThresholds) -> tuple[str, list[str]]:
    """Each tower's verdict (set in place) and the worst with its reasons, naming tower and metric."""
    worst, reasons = "pass", []
    for tower, m in towers.items():
        fails, warns = [], []
        if m["first_nonfinite_module"]:
            fails.append(f"non-finite output from {m['first_nonfinite_module']} on an image prompt")
        cosine = m["embedding_cosine_min"]
        if cosine is None or cosine < t.embedding_cosine_fail:
            fails.append(f"embedding cosine {cosine if cosine is None else round(cosine, 4)} < "
                         f"{t.embedding_cosine_fail} (fail)")
        elif cosine < t.embedding_cosine_warn:
            warns.append(f"embedding cosine {cosine:.4f} < {t.embedding_cosine_warn} (warn)")
        if m["kl_mean"] > t.kl_mean_fail:
            fails.append(f"image-prompt KL mean {m['kl_mean']:.4f} > {t.kl_mean_fail} (fail)")
        elif m["kl_mean"] > t.kl_mean_warn:
            warns.append(f"image-prompt KL mean {m['kl_mean']:.4f} > {t.kl_mean_warn} (warn)")
        m["verdict"] = "fail" if fails else "warn" if warns else "pass"
        reasons += [f"{tower}: {r}" for r in fails + warns]
        worst = max(worst, m["verdict"], key=["pass", "warn", "fail"].index)
    return worst, reasons
