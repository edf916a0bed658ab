"""Run configuration: YAML recipes -> typed dataclasses (config_schema.py), with `key=value` overrides.

Every unknown key, missing file and impossible setting fails here, before any training, with a
message that names the key (e.g. `stages[1].group_size: batch of 12 prompts x 5 ...`; config_checks.py).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .config_checks import (  # noqa: F401 (the checks, by the names the trainer, the plan and the tests use)
    check_installed,
    check_ranks,
    eval_metric_names,
    eval_splits,
    validate,
)
from .config_schema import (  # noqa: F401 (the recipe's sections and keys, by their historical home)
    DATA_FORMATS,
    LR_SCHEDULES,
    SECTIONS,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    EarlyStoppingConfig,
    EvalConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    StageConfig,
    SyntheticConfig,
    VLLMConfig,
    changed_keys,
    describe_keys,
    fingerprint,
    generation_engine,
    identity,
    key_meanings,
)


def _build(cls, raw, where: str):
    """Dataclass `cls` from a dict, recursively; unknown keys and wrong types name their path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'the recipe'}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"{where or 'the recipe'}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        hint, path = hints[key], f"{where}.{key}" if where else key
        kwargs[key] = _coerce(hint, value, path)
    return cls(**kwargs)


def _coerce(hint, value, path):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (origin is not None and type(None) in args):
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    if origin is list or hint is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{path}.{k}") for k, v in value.items()} if args else value
    return value


def _set_override(raw: dict, dotted: str, value) -> None:
    """`stages.0.lr=1e-4` style overrides on the raw YAML dict."""
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + " ".join(str(getattr(e, "problem", None) or e).split())


def read_yaml(p: Path):
    try:
        return yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: broken YAML at {_yaml_problem(e)}") from None


def read_recipe(path, what: str, sections: str) -> dict:
    """The YAML mapping in file `path` (a train or study recipe); a missing file, a folder, broken YAML or anything
    but a mapping is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} {'is a folder' if p.is_dir() else 'not found'}")
    raw = read_yaml(p)
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a recipe is a mapping of sections ({sections})")
    return raw


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """raw with each `key=value` (a dotted key, a YAML value) set; a malformed one is a ConfigError naming it."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: not a YAML value ({_yaml_problem(e)})") from None
        try:
            _set_override(raw, key, value)
        except (IndexError, ValueError, AttributeError, TypeError) as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return raw


def load_config(path=None, overrides: list[str] | None = None, *, raw: dict | None = None) -> Config:
    """Read a YAML recipe (or a raw dict), apply `key=value` overrides, build and validate."""
    if raw is None:
        if path is None:
            raise ConfigError("no config: pass --config recipes/X.yaml")
        raw = read_recipe(path, "config file", "run, model, data, ..., stages")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections (run, model, data, ..., stages)")
    raw = apply_overrides(dict(raw), overrides)
    stages = raw.pop("stages", None)
    cfg = _build(Config, raw, "")
    if not stages:
        raise ConfigError("stages: a recipe lists at least one stage")
    if not isinstance(stages, list):
        raise ConfigError("stages: expected a list of stages")
    cfg.stages = [_build(StageConfig, s, f"stages[{i}]") for i, s in enumerate(stages)]
    validate(cfg)
    return cfg
