"""Per-tower validation of a multimodal checkpoint: the text prompts never run its vision or audio tower,
so the image and audio prompts of data/multimodal do. For each prompt: what the tower hands the language
model (the projector's output embeddings), the next-token distribution on the media+question prompt, a
scan for non-finite outputs over every module, and the greedy answer; the reference's are measured once
and cached like its text statistics.
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantgate import modeling
from quantgate.backends import ValidateThresholds
from quantgate.drift import kl_per_token
from quantgate.files import cached_tensors, save_tensors, sha256_file
from quantgate.nonfinite import NonFiniteScan
from quantgate.paths import DATA_DIR
from quantgate.processors import read_wav

PROMPTS = DATA_DIR / "multimodal" / "prompts.jsonl"
BLIND_FLOOR = 1e-4  # input dependence below which a tower hands over the same whatever it is shown


@dataclass(frozen=True)
class Sense:
    """A kind of prompt and the tower that reads it."""
    kind: str  # the prompts' `kind` in prompts.jsonl
    tower: str  # the tower module's last name
    config: str  # the model config's sub-config for it
    features: str  # the model's method that returns what the tower hands the language model

    def present(self, model) -> bool:
        return getattr(model.config, self.config, None) is not None and features_method(model, self) is not None

    def tower_name(self, model) -> str:
        return next(name for name, _ in model.named_modules() if name.endswith(self.tower))

    def inputs(self, processor, prompt: dict) -> dict:
        """The processor's inputs for one prompt: its medium where the medium's token goes, then the question."""
        if self.kind == "image":
            from PIL import Image

            image = Image.open(PROMPTS.parent / prompt["file"]).convert("RGB")
            return processor(text=f"{processor.image_token}\n{prompt['question']}", images=image, return_tensors="pt")
        clip = read_wav(PROMPTS.parent / prompt["file"], processor.feature_extractor.sampling_rate)
        return processor(text=f"{processor.audio_token}\n{prompt['question']}", audio=clip, return_tensors="pt")


SENSES = (Sense("image", "vision_tower", "vision_config", "get_image_features"),
          Sense("audio", "audio_tower", "audio_config", "get_audio_features"))


def features_method(model, sense: Sense):
    """The model's (or its inner model's: Gemma 4 keeps get_audio_features there) features method."""
    return getattr(model, sense.features, None) or getattr(getattr(model, "model", None), sense.features, None)


def senses(model) -> list[Sense]:
    return [s for s in SENSES if s.present(model)]


def prompts(kind: str, path: Path = PROMPTS) -> list[dict]:
    return [p for p in map(json.loads, path.read_text().splitlines()) if p["kind"] == kind]


def handed_over(model, sense: Sense, inputs: dict) -> torch.Tensor:
    """What the tower hands the language model for these inputs, a row per soft token (padding positions left out)."""
    method = features_method(model, sense)
    out = method(**{k: v for k, v in inputs.items() if k in inspect.signature(method).parameters})
    pooled = out.pooler_output
    if isinstance(pooled, (tuple, list)):  # Gemma 4: one tensor per image
        pooled = torch.cat(list(pooled))
    mask = getattr(out, "attention_mask", None)
    if mask is not None and mask.shape == pooled.shape[:-1]:
        pooled = pooled[mask.bool()]
    return pooled.float().cpu().reshape(-1, pooled.shape[-1])


@torch.no_grad()
def measure(model, processor, max_new_tokens: int) -> dict:
    """Per sense and prompt: the handed-over embeddings, the last position's logits, the non-finite modules,
    the greedy answer."""
    dtype = getattr(torch, modeling.computed_dtype(model))
    device = next(model.parameters()).device
    measured = {}
    for sense in senses(model):
        measured[sense.kind] = []
        for prompt in prompts(sense.kind):
            inputs = sense.inputs(processor, prompt).to(device)
            for key, value in inputs.items():  # pixels and audio features in the compute dtype
                if value.is_floating_point():
                    inputs[key] = value.to(dtype)
            rows = handed_over(model, sense, inputs)
            with NonFiniteScan(model) as scan:
                logits = model(**inputs).logits[0, -1].float().cpu()
            answer = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            measured[sense.kind].append({
                "id": prompt["id"], "features": rows.flatten(), "pooled": rows.mean(0), "logits": logits,
                "nonfinite": scan.flagged(),
                "answer": processor.decode(answer[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)})
    return measured


def cache_name() -> str:
    """The cache file's name, keyed by the prompt set (a changed prompt set is measured again)."""
    return f"towers-v3-{sha256_file(PROMPTS)[:12]}.pt"


def reference_towers(model, processor, cache: Path, max_new_tokens: int) -> dict | None:
    """The reference's measurements on the image and audio prompts, cached at `cache` (plain tensors)."""
    if not senses(model):
        return None
    if not cache.is_file() or cached_tensors(cache) is None:
        stats = measure(model, processor, max_new_tokens)
        save_tensors(cache, stats)
    return {"path": str(cache), "prompts": {s.kind: len(prompts(s.kind)) for s in senses(model)}}


def metrics(reference: list[dict], measured: list[dict]) -> dict:
    """One tower's metrics against the reference's: embedding cosine, next-token KL and top-1, answers."""
    cosines, kls, top1, answers, nonfinite = [], [], [], [], []
    for r, m in zip(reference, measured):
        cosines.append(float(torch.nn.functional.cosine_similarity(r["features"], m["features"], dim=0)))
        kls.append(float(kl_per_token(r["logits"], m["logits"])))
        top1.append(float(r["logits"].argmax() == m["logits"].argmax()))
        answers.append({"prompt": r["id"], "reference": r["answer"], "quantized": m["answer"]})
        nonfinite += [name for name in m["nonfinite"] if name not in nonfinite]
    finite = [c for c in cosines if c == c]
    return {"prompts": len(measured), "embedding_cosine_mean": sum(finite) / len(finite) if finite else None,
            "embedding_cosine_min": min(finite) if finite else None, "kl_mean": sum(kls) / len(kls),
            "top1_agreement": sum(top1) / len(top1), "first_nonfinite_module": nonfinite[0] if nonfinite else None,
            "input_dependence": input_dependence(measured), "reference_input_dependence": input_dependence(reference),
            **answer_scores(answers), "answers": answers}


def input_dependence(measured: list[dict]) -> float:
    """How far what the tower hands over moves from one input to the next: the mean of 1 - cosine between the
    average soft token of consecutive prompts. 0 for a tower that hands over the same (or nothing) whatever it is shown."""
    pooled = [m["pooled"] for m in measured]
    moves = [1 - float(torch.nn.functional.cosine_similarity(a, b, dim=0)) if a.norm() * b.norm() > 0 else 0.0
             for a, b in zip(pooled, pooled[1:])]
    return round(sum(moves) / len(moves), 6) if moves else 0.0


def answer_scores(answers: list[dict]) -> dict:
    """The answers that match the reference's, against the best one answer given to every prompt (club-3090's check
    for a blind tower that answers fluently)."""
    same = sum(a["quantized"].strip() == a["reference"].strip() for a in answers) / len(answers)
    references = [a["reference"].strip() for a in answers]
    constant = max(references.count(r) for r in references) / len(references)
    return {"answer_agreement": round(same, 4), "constant_answer_agreement": round(constant, 4)}


def compare(model, processor, reference: dict, max_new_tokens: int) -> dict:
    """Each tower's metrics (`model.vision_tower`, `model.audio_tower`) on its own prompts."""
    ref = torch.load(reference["path"], weights_only=True)
    mine = measure(model, processor, max_new_tokens)
    return {sense.tower_name(model): {"kind": sense.kind, **metrics(ref[sense.kind], mine[sense.kind])}
            for sense in senses(model)}


def blind(mine: float, reference: float) -> bool:
    """A tower whose output barely moves with its input: under a tenth of the reference's movement, or none at all
    (which a reference that is blind itself cannot excuse)."""
    return mine < max(BLIND_FLOOR, 0.1 * reference)


def verdicts(towers: dict, t: ValidateThresholds) -> tuple[str, list[str]]:
    """Each tower's verdict (set in place) and the worst with its reasons, naming tower and metric."""
    worst, reasons = "pass", []
    for tower, m in towers.items():
        fails, warns = [], []
        if m["first_nonfinite_module"]:
            fails.append(f"non-finite output from {m['first_nonfinite_module']} on an {m['kind']} prompt")
        cosine = m["embedding_cosine_min"]
        if cosine is None or cosine < t.embedding_cosine_fail:
            fails.append(f"embedding cosine {cosine if cosine is None else round(cosine, 4)} < "
                         f"{t.embedding_cosine_fail} (fail)")
        elif cosine < t.embedding_cosine_warn:
            warns.append(f"embedding cosine {cosine:.4f} < {t.embedding_cosine_warn} (warn)")
        if m["kl_mean"] > t.kl_mean_fail:
            fails.append(f"{m['kind']}-prompt KL mean {m['kl_mean']:.4f} > {t.kl_mean_fail} (fail)")
        elif m["kl_mean"] > t.kl_mean_warn:
            warns.append(f"{m['kind']}-prompt KL mean {m['kl_mean']:.4f} > {t.kl_mean_warn} (warn)")
        if blind(m["input_dependence"], m["reference_input_dependence"]):
            fails.append(f"blind: what it hands over no longer depends on the {m['kind']} (input dependence "
                         f"{m['input_dependence']:.4g}, the reference's {m['reference_input_dependence']:.4g})")
        m["verdict"] = "fail" if fails else "warn" if warns else "pass"
        reasons += [f"{tower}: {r}" for r in fails + warns]
        worst = max(worst, m["verdict"], key=["pass", "warn", "fail"].index)
    return worst, reasons
