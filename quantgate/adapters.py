"""LoRA adapters on a recipe's quantized base, as users serve them (peft on the saved checkpoint): where an adapter
comes from, its targets and shapes checked against the model's module tree before any weight is loaded, and what it
does on the reference and on each recipe: its effect, how much of it survives the quantization, merge, unmerge and
reload."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch

from quantgate import drift
from quantgate.formats import error_line

FILES = ("adapter_config.json", "adapter_model.safetensors")
LORA_WEIGHT = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")
NAME = "adapter"  # the name the adapter is loaded under; `reloaded` is its saved copy


class AdapterError(ValueError):
    """An adapter that cannot apply to this model; `field` is the adapter field at fault."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def fetch(source: str, cache_dir: Path) -> Path:
    """The adapter's folder: a local folder as it is, a Hub adapter (hf:ORG/NAME[@REVISION]) its config and weights
    downloaded into the cache."""
    if source.startswith("hf:"):
        from huggingface_hub import snapshot_download

        repo, _, revision = source.removeprefix("hf:").partition("@")
        try:
            folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=list(FILES),
                                            cache_dir=Path(cache_dir) / "adapters"))
        except Exception as e:  # offline, no such repo, no access: the config error says which
            raise AdapterError("source", f"{source}: could not download the adapter: {error_line(e)}") from None
    else:
        folder = Path(source)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise AdapterError("source", f"{folder} has no {' or '.join(missing)}: an adapter folder is what peft's "
                                     "save_pretrained writes")
    return folder


def read_config(folder: Path):
    """The adapter's peft config; only LoRA is gated."""
    from peft import PeftConfig

    raw = json.loads((folder / "adapter_config.json").read_text())
    if raw.get("peft_type") != "LORA":
        raise AdapterError("source", f"{folder}: peft_type {raw.get('peft_type')!r}; quantgate gates LoRA adapters "
                                     "(peft_type LORA)")
    return PeftConfig.from_pretrained(folder)


def weight_shapes(folder: Path) -> dict[str, dict[str, list[int]]]:
    """Per adapted module path, its LoRA matrices' shapes as saved (A: r x in, B: out x r)."""
    from safetensors import safe_open

    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(folder / "adapter_model.safetensors", "pt") as f:
        for key in f.keys():
            if found := LORA_WEIGHT.match(key):
                shapes.setdefault(found["module"], {})[found["part"]] = list(f.get_slice(key).get_shape())
    return shapes


def adaptable(module: torch.nn.Module) -> bool:
    """Whether peft's LoRA adapts this module type (what its dispatch takes on an unquantized model)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
                               torch.nn.MultiheadAttention, Conv1D))


def targets(config, names: list[str]) -> list[str]:
    """The module paths peft would adapt, matched as peft matches them."""
    from peft.tuners.tuners_utils import _ExcludedModule, check_target_module_exists

    return [n for n in names if n and (hit := check_target_module_exists(config, n)) and not isinstance(hit, _ExcludedModule)]


def target_problems(config, model: torch.nn.Module) -> list[str]:
    """Each target pattern that matches nothing, or matches a wrapper peft cannot adapt, with the name that would."""
    if config.target_modules == "all-linear":  # peft expands it to the Linear layers themselves
        return []
    modules = dict(model.named_modules())
    adapted = targets(config, list(modules))
    if isinstance(config.target_modules, str):  # one regular expression, matched whole
        by_pattern = {config.target_modules: adapted}
    else:  # names, each matching a module path that ends in it
        by_pattern = {p: [n for n in adapted if n == p or n.endswith("." + p)] for p in sorted(config.target_modules or [])}
    problems = []
    for pattern, hits in by_pattern.items():
        if not hits:
            problems.append(f"'{pattern}' matches no module of {type(model).__name__}{suggestion(pattern, modules)}")
            continue
        if wrappers := [n for n in hits if not adaptable(modules[n])]:
            inner = next((f"{pattern}.{child}" for child, m in modules[wrappers[0]].named_children() if adaptable(m)),
                         None) if isinstance(config.target_modules, (list, set)) else None
            hint = f"; the layer inside is '{inner}': target that" if inner else ""
            problems.append(f"'{pattern}' matches {len(wrappers)} modules peft cannot adapt, such as {wrappers[0]} "
                            f"({type(modules[wrappers[0]]).__name__}){hint}")
    return problems


def suggestion(pattern: str, modules: dict[str, torch.nn.Module]) -> str:
    """A did-you-mean hint with the module name closest to the pattern's last part, or nothing."""
    import difflib

    last = pattern.split(".")[-1]
    near = difflib.get_close_matches(last, sorted({n.split(".")[-1] for n in modules if n}), n=1, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def shape_problems(shapes: dict[str, dict[str, list[int]]], model: torch.nn.Module) -> list[str]:
    """Adapter weights for modules the model lacks, or whose sizes differ from the model's layer."""
    modules = dict(model.named_modules())
    problems = []
    for name, parts in shapes.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"the adapter has weights for {name}, which {type(model).__name__} does not have")
        elif isinstance(module, torch.nn.Linear) and "A" in parts and "B" in parts and \
                (parts["A"][1] != module.in_features or parts["B"][0] != module.out_features):
            problems.append(f"{name}: the adapter's lora_A is {parts['A'][0]}x{parts['A'][1]} and lora_B "
                            f"{parts['B'][0]}x{parts['B'][1]}, but the layer is {module.out_features}x{module.in_features}")
    return problems[:3] + ([f"and {len(problems) - 3} more"] if len(problems) > 3 else [])


def check(folder: Path, model: torch.nn.Module) -> list[tuple[str, str]]:
    """(field, problem) for everything that keeps the adapter off this model (its skeleton, on the meta device)."""
    try:
        config = read_config(folder)
        shapes = weight_shapes(folder)
    except AdapterError:
        raise
    except Exception as e:  # a malformed adapter_config.json, a truncated safetensors file
        raise AdapterError("source", f"{folder}: not a readable peft adapter: {error_line(e)}") from None
    problems = [("target_modules", p) for p in target_problems(config, model)]
    return problems + [("source", p + " (an adapter for another base model?)")
                       for p in shape_problems(shapes, model)]


def describe(folder: Path) -> str:
    """One line for `quantgate plan`: the LoRA's rank, targets and how many modules it adapts."""
    config = read_config(folder)
    named = config.target_modules
    named = named if isinstance(named, str) else ", ".join(sorted(named))
    return f"LoRA of rank {config.r} on {len(weight_shapes(folder))} modules ({named}), from {folder}"


def attach(model: torch.nn.Module, folder: Path):
    """The model with the adapter loaded on top, as peft loads it for serving; an offloaded model's known failure
    named as such."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder), adapter_name=NAME, is_trainable=False).eval()
    except (RuntimeError, NotImplementedError) as e:
        if "meta tensor" in str(e):
            raise AdapterError("source", f"peft could not load the adapter onto a model offloaded in part (its "
                                         f"offloaded weights are meta tensors): {error_line(e)}") from None
        raise


@contextlib.contextmanager
def attached(model: torch.nn.Module, folder: Path):
    """The model with the adapter loaded on top (attach), unloaded again on leaving: the model is as it was."""
    adapted = attach(model, folder)
    try:
        yield adapted
    finally:
        adapted.unload()


@torch.no_grad()
def effect_on(model, prompts: list[dict]) -> dict:
    """How far the adapter moves the model it is on: KL(without || with) per token and the tokens whose top-1 it
    changes, over the validation prompts' ids."""
    kls, changed = [], []
    for prompt in prompts:
        ids = prompt["ids"].to(next(model.parameters()).device)
        adapted = model(input_ids=ids).logits[0].float().cpu()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits[0].float().cpu()
        kls.append(drift.kl_per_token(plain, adapted))
        changed.append(top1_parts(adapted, plain))
    kl, moved = torch.cat(kls), torch.cat(changed)
    return {"kl_mean": float(kl.mean()), "changed_tokens": int(moved.sum()), "tokens": int(moved.numel())}


def top1_parts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per token, whether two models' top-1 differ beyond ties: no token tied for the top in one is tied for it in
    the other (bf16 logits tie often: a tie broken one way here and the other way there is not a change)."""
    return ~((a == a.max(-1, keepdim=True).values) & (b == b.max(-1, keepdim=True).values)).any(-1)


def stored_top1_parts(a: dict, b: dict) -> torch.Tensor:
    """top1_parts from two measurements' stored top-k log-probs and their token ids."""
    a_top = torch.where(a["top_logp"] == a["top_logp"][:, :1], a["top_idx"], -1)
    b_top = torch.where(b["top_logp"] == b["top_logp"][:, :1], b["top_idx"], -2)
    return ~(a_top[:, :, None] == b_top[:, None, :]).any(-1).any(-1)


MIN_DECIDED = 20  # tokens whose top-1 the adapter changes in high precision, below which what survives is not judged


class Survival:
    """Collects, prompt by prompt as validate's comparison runs on a recipe's base with the adapter (drift.compare's
    `each`), the adapter's effect there (KL without || with, exact) and, of the tokens whose top-1 it changes on the
    reference, the share it still changes the same way (kept) or that fall back to the base's top-1 (reverted)."""

    def __init__(self, model, base: dict):
        self.model, self.base = model, {p["id"]: p for p in base["prompts"]}
        self.kls, self.kept, self.reverted = [], [], []

    @torch.no_grad()
    def __call__(self, adapted_ref: dict, logits: torch.Tensor, compared: dict) -> None:
        plain_ref = self.base[adapted_ref["id"]]
        with self.model.disable_adapter():
            plain = self.model(input_ids=adapted_ref["ids"].to(next(self.model.parameters()).device)).logits[0]
        self.kls.append(drift.kl_per_token(plain.float().cpu(), logits))
        decided = stored_top1_parts(adapted_ref, plain_ref)
        self.kept.append(compared["top1"].bool()[decided])
        # As kept is counted: the base's token ranked as high as the model's own top-1, ties included.
        base_top = logits.gather(-1, plain_ref["top_idx"][:, :1])[:, 0]
        self.reverted.append((base_top >= logits.max(-1).values)[decided])

    def result(self) -> dict:
        kept, reverted = torch.cat(self.kept), torch.cat(self.reverted)
        n = int(kept.numel())
        return {"kl_mean": float(torch.cat(self.kls).mean()), "decided_tokens": n,
                "kept": float(kept.float().mean()) if n else None, "reverted": float(reverted.float().mean()) if n else None}


def effect_verdict(effect: dict, drift_kl: float | None, t) -> tuple[str, list[str]]:
    """Whether the recipe keeps what the adapter does: its share of the adapter's decided tokens, against the
    recipe's adapter_kept thresholds, beside how its drift compares with the adapter's effect; too few decided
    tokens to judge is said, not judged."""
    n, kept = effect["decided_tokens"], effect["kept"]
    if n < MIN_DECIDED:
        return "pass", [f"the adapter changes the reference's top-1 on {n} tokens only: too few to judge what survives"]
    scale = (f"; the recipe's drift with the adapter (KL {drift_kl:.3g}) is {drift_kl / effect['kl_mean_reference']:.1f}x "
             "the adapter's own effect" if drift_kl is not None and effect["kl_mean_reference"] > 0 else "")
    said = lambda what, at, level: (  # noqa: E731
        f"the adapter's effect {what}: of the {n} tokens whose top-1 the adapter changes in high precision, the "
        f"recipe keeps {kept:.0%} < {at:.0%} ({level} threshold), {effect['reverted']:.0%} back to the base's own{scale}")
    if kept < t.adapter_kept_fail:
        return "fail", [said("is lost", t.adapter_kept_fail, "fail")]
    if kept < t.adapter_kept_warn:
        return "warn", [said("weakens", t.adapter_kept_warn, "warn")]
    return "pass", []


def equivalence(model, tokenizer, scratch: Path) -> dict:
    """Saved and loaded again, the adapter gives the same logits; merged into the recipe's weights and unmerged, how
    far the logits move (where the recipe's library lets peft merge: a quantized weight is requantized)."""
    from quantgate import modeling

    before = modeling.probe_logits(model, tokenizer)
    model.save_pretrained(scratch, save_embedding_layers=False)  # "auto" would look the base model up on the Hub
    model.load_adapter(str(scratch / NAME) if (scratch / NAME).is_dir() else str(scratch), adapter_name="reloaded")
    model.set_adapter("reloaded", inference_mode=True)
    found = {"reload": modeling.compare_logits(before, modeling.probe_logits(model, tokenizer))}
    model.set_adapter(NAME, inference_mode=True)
    model.delete_adapter("reloaded")
    try:
        model.merge_adapter()
        merged = modeling.probe_logits(model, tokenizer)
        model.unmerge_adapter()
    except Exception as e:  # a library whose layers peft cannot merge into: said, not a failure
        return {**found, "merge": {"supported": False, "reason": error_line(e)}}
    return {**found, "merge": {"supported": True, **modeling.compare_logits(before, merged)},
            "unmerge": modeling.compare_logits(before, modeling.probe_logits(model, tokenizer))}


def equivalence_warnings(found: dict) -> list[str]:
    """What a user serving the adapter should know: a reload that changes logits, a merge that moves top-1."""
    said = []
    if not found["reload"]["identical"]:
        said.append(f"the adapter saved and loaded again gives other logits (max |diff| "
                    f"{found['reload']['max_abs_logit_diff']:.3g})")
    for step in ("merge", "unmerge"):
        if (got := found.get(step)) and got.get("top1_agreement", 1) < 0.99:
            said.append(f"{step} changes the top-1 of {1 - got['top1_agreement']:.1%} of the probe tokens (the "
                        "quantized weights are requantized)")
    return said
