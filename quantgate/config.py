"""The one schema for run configs, and the loader that turns YAML into it.

A run config names a model and a list of recipes. A recipe is either the name of a file in
configs/recipes/ or a mapping `{use: NAME, ...fields to override}`; the loader merges the two
before validation, so every error names the file and field it came from.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, PositiveInt, SerializeAsAny, ValidationError, field_validator

from quantgate.backends import RecipeBase, Strict, methods, parse_recipe
from quantgate.paths import DASHBOARD, HISTORY_DB, RECIPES_DIR, HistoryDb, Rooted, is_database_url
from quantgate.settings import AdapterSpec, GateSettings, ModelSpec, Output, Steps


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


class RunConfig(Strict):
    model: ModelSpec
    # Each recipe is its backend's model (quantgate.backends), told apart by `method`.
    recipes: list[SerializeAsAny[RecipeBase]] = Field(min_length=1)
    # LoRA adapters served on the model, each gated with every recipe.
    adapters: list[AdapterSpec] = []
    steps: Steps = Steps()
    output: Output = Output()

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, adapters: list[AdapterSpec]) -> list[AdapterSpec]:
        names = [a.name for a in adapters]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dupes)}")
        return adapters

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
    return _adapters_from_registry(config, path)


def _adapters_from_registry(config: RunConfig, path: Path) -> RunConfig:
    """Each `registry:NAME[/vN]` adapter as its version's folder, checked intact now: the record names the version
    the run served."""
    from quantgate.registry import RegistryError, adapter_folder

    errors, served = [], []
    for i, spec in enumerate(config.adapters):
        if spec.source.startswith("registry:"):
            try:
                spec = spec.model_copy(update={"source": str(adapter_folder(spec.source, config.steps.publish.registry_dir))})
            except RegistryError as e:
                errors.append(ConfigError(path, f"adapters[{i}].source", str(e)))
        served.append(spec)
    if errors:
        raise ConfigError.of(errors)
    return config.model_copy(update={"adapters": served})


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
    return ConfigError(_unsecret(str(origin)), field, _unsecret(f"{message}; got {err.get('input')!r}"))


def _unsecret(text: str) -> str:
    """A URL's password starred out: an error goes to terminals and CI logs."""
    return re.sub(r"(password=)[^&\s'\"]+", r"\1***", re.sub(r"(://[^/:@\s]*:)[^@\s]+@", r"\1***@", text))


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


def _unreachable(url: str) -> str | None:
    """Why the history's database server cannot take this run's record, asked before any heavy work."""
    from quantgate import history

    try:
        history.connect(url, create=True)
    except history.HistoryError as e:
        return str(e)
    return None


def writable(config: RunConfig, config_path: str | Path) -> None:
    """Every place a run writes (runs, cache, registry, history), checked before any heavy work."""
    places = [("output.runs_dir", config.output.runs_dir, False), ("output.cache_dir", config.output.cache_dir, False)]
    if not is_database_url(config.output.history_db):
        places.append(("output.history_db", config.output.history_db, True))
    if config.steps.publish.target == "local":
        places.append(("steps.publish.registry_dir", config.steps.publish.registry_dir, False))
    errors = [ConfigError(config_path, field, why) for field, path, is_file in places
              if (why := _unwritable(Path(path), is_file))]
    if is_database_url(config.output.history_db) and (why := _unreachable(config.output.history_db)):
        errors.append(ConfigError(config_path, "output.history_db", why))
    if errors:
        raise ConfigError.of(errors)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


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
    history_db: HistoryDb = HISTORY_DB
    dashboard: Rooted = DASHBOARD


def load_nightly(path: str | Path) -> NightlyConfig:
    path = Path(path)
    data = _read_yaml(path)
    try:
        config = NightlyConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "-"
        raise ConfigError(path, field, _unsecret(f"{err['msg']}; got {err.get('input')!r}")) from None
    for i, model in enumerate(config.models):
        if not model.config.is_file():
            raise ConfigError(path, f"models.{i}.config", f"{model.config}: file not found")
        for recipe in config.recipes:
            load_config(model.config, [*model.overrides, f"recipes=[{recipe}]"])
    return config

