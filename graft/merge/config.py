"""Read a mergekit-style merge YAML into a validated `MergeConfig`.

Accepted keys (mergekit 0.1.5 names): `merge_method`, `base_model`, `models: [{model, parameters}]`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source`. A parameter value is a scalar, a gradient (a
list of numbers interpolated across the layers), `{filter, value}` or a list of those (the first whose
`filter` is a substring of the tensor name wins; no filter or `*` matches all). Model paths are local
HF folders; relative paths are tried against the working directory, then the config's folder.

Every problem is a `MergeConfigError` whose one-line message names the file and the key, e.g.
`merge.yaml: models[1].parameters.density: input should be a valid number`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from graft.merge.base import MERGE_METHODS, BasePolicy, Param, Scope, spec_of
from graft.strict_yaml import load_yaml

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
UNSUPPORTED_KEYS = {"slices", "modules", "tokenizer", "chat_template"}
# mergekit parameter names that some method reads; harmless (ignored with a warning) for the others.
MERGEKIT_PARAMS = {"weight", "density", "lambda", "normalize", "rescale", "t", "epsilon", "gamma", "int8_mask", "filter_wise"}


class MergeConfigError(ValueError):
    """A merge config graftline refuses; the message names the file and the offending key."""


@dataclass(frozen=True)
class Conditional:
    """`{filter, value}`: applies `value` to tensors whose name contains `filter` (None or '*': all)."""

    filter: str | None
    value: Any


@dataclass(frozen=True)
class ModelInput:
    """One entry of `models:`: a local HF folder and its own parameter settings."""

    path: Path
    parameters: dict[str, Any]
    key: str  # 'models[i]' for messages


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge config; `source` is the YAML file it came from."""

    source: Path
    merge_method: str
    models: tuple[ModelInput, ...]
    base_model: Path | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    out_dtype: torch.dtype | None = None
    tokenizer_source: Path | None = None

    def error(self, key: str, message: str) -> MergeConfigError:
        return MergeConfigError(f"{self.source}: {key}: {message}")


def _first_line(e: ValidationError) -> str:
    return e.errors()[0]["msg"].lower() if e.errors() else str(e).splitlines()[0]


def check_value(param: Param, value: Any, fail) -> Any:
    """Validate one scalar against `param`'s type; `fail(msg)` raises with the key attached."""
    try:
        return param.validate(value)
    except ValidationError as e:
        raise fail(f"{_first_line(e)} (got {value!r})") from None


def parse_setting(raw: Any, param: Param | None, fail) -> Any:
    """A parameter setting as scalar / list (gradient) / Conditional / list[Conditional], values validated."""
    def scalar(v: Any) -> Any:
        if isinstance(v, (list, dict)) or v is None:
            raise fail(f"expected a scalar, got {v!r}")
        return check_value(param, v, fail) if param is not None else v

    def conditional(d: dict) -> Conditional:
        extra = set(d) - {"filter", "value"}
        if extra or "value" not in d:
            raise fail(f"a conditional setting has keys 'value' and optional 'filter' (got {sorted(d)})")
        value = d["value"]
        value = [scalar(v) for v in value] if isinstance(value, list) else scalar(value)
        return Conditional(None if d.get("filter") is None else str(d["filter"]), value)

    if isinstance(raw, dict):
        return conditional(raw)
    if isinstance(raw, list):
        if all(isinstance(v, dict) for v in raw):
            return [conditional(v) for v in raw]
        if any(isinstance(v, dict) for v in raw):
            raise fail("a list mixes conditional {filter, value} entries with plain values")
        return [scalar(v) for v in raw]
    return scalar(raw)


def _parse_parameters(raw: Any, key: str, method: str, fail_at) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise fail_at(key, f"expected a mapping of parameter names, got {type(raw).__name__}")
    spec = spec_of(method)
    known_anywhere = MERGEKIT_PARAMS | {p.name for m in MERGE_METHODS for p in spec_of(m).params}
    out = {}
    for name, value in raw.items():
        param = spec.param(str(name))
        if param is None:
            if name not in known_anywhere:
                known = ", ".join(p.name for p in spec.params)
                raise fail_at(f"{key}.{name}", f"unknown parameter for {method}; known: {known}")
            log.warning("%s.%s is not a parameter of %s (mergekit ignores it too)", key, name, method)
            continue
        if key != "parameters" and param.scope is Scope.SHARED:
            log.warning("%s.%s: %s reads %r from the global parameters only (as mergekit does); ignored here",
                        key, name, method, name)
            continue
        out[str(name)] = parse_setting(value, param, lambda msg, k=f"{key}.{name}": fail_at(k, msg))
    return out


def _resolve_path(value: Any, config_dir: Path, key: str, fail_at) -> Path:
    if not isinstance(value, str) or not value:
        raise fail_at(key, f"expected a local model folder path, got {value!r}")
    p = Path(value).expanduser()
    for candidate in (p, config_dir / p) if not p.is_absolute() else (p,):
        if candidate.is_dir():
            return candidate.resolve()
    raise fail_at(key, f"no such model folder {value!r} (only local HF folders are supported)")


def _dtype(value: Any, key: str, fail_at) -> torch.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPES:
        raise fail_at(key, f"unknown dtype {value!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_merge_config(data: Any, source: str | Path) -> MergeConfig:
    """Validate an already-loaded YAML document (see module docstring); `source` names it in errors."""
    source = Path(source)

    def fail_at(key: str, message: str) -> MergeConfigError:
        return MergeConfigError(f"{source}: {key}: {message}")

    if not isinstance(data, dict):
        raise MergeConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key in data:
        if key in UNSUPPORTED_KEYS:
            raise fail_at(str(key), "not supported by graftline (use models: with one merge_method)")
        if key not in TOP_KEYS:
            raise fail_at(str(key), f"unknown key; known: {', '.join(sorted(TOP_KEYS))}")
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise fail_at("merge_method", f"required, one of: {', '.join(MERGE_METHODS.names())}")
    if method not in MERGE_METHODS:
        raise fail_at("merge_method", f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS.names())}")
    spec = spec_of(method)
    config_dir = source.parent

    raw_models = data.get("models")
    if not isinstance(raw_models, list) or not raw_models:
        raise fail_at("models", "required: a non-empty list of {model, parameters}")
    models = []
    for i, entry in enumerate(raw_models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise fail_at(key, "expected {model: PATH, parameters: {...}}")
        extra = set(entry) - {"model", "parameters"}
        if extra:
            raise fail_at(f"{key}.{min(extra)}", "unknown key; known: model, parameters")
        path = _resolve_path(entry["model"], config_dir, f"{key}.model", fail_at)
        models.append(ModelInput(path, _parse_parameters(entry.get("parameters"), f"{key}.parameters", method, fail_at), key))

    base = None
    if data.get("base_model") is not None:
        base = _resolve_path(data["base_model"], config_dir, "base_model", fail_at)
    elif spec.base is BasePolicy.REQUIRED:
        raise fail_at("base_model", f"required by {method}")

    tokenizer = data.get("tokenizer_source")
    if tokenizer == "union":
        raise fail_at("tokenizer_source", "'union' is not supported; use 'base' or a model folder")
    if tokenizer == "base":
        if base is None:
            raise fail_at("tokenizer_source", "'base' needs base_model")
        tokenizer = base
    elif tokenizer is not None:
        tokenizer = _resolve_path(tokenizer, config_dir, "tokenizer_source", fail_at)

    config = MergeConfig(
        source=source, merge_method=method, models=tuple(models), base_model=base,
        parameters=_parse_parameters(data.get("parameters"), "parameters", method, fail_at),
        dtype=_dtype(data.get("dtype"), "dtype", fail_at), out_dtype=_dtype(data.get("out_dtype"), "out_dtype", fail_at),
        tokenizer_source=tokenizer)
    _check_inputs(config)
    return config


def _check_inputs(config: MergeConfig) -> None:
    """Input counts and required parameters that can be checked without opening the models."""
    spec = spec_of(config.merge_method)
    paths = [m.path for m in config.models]
    if len(set(paths)) != len(paths):
        dup = next(m for i, m in enumerate(config.models) if m.path in paths[:i])
        raise config.error(f"{dup.key}.model", f"{dup.path} is listed twice")
    n_inputs = len(paths) + (config.base_model is not None and config.base_model not in paths)
    if n_inputs < spec.min_inputs or (spec.max_inputs is not None and n_inputs > spec.max_inputs):
        want = spec.min_inputs if spec.min_inputs == spec.max_inputs else f"at least {spec.min_inputs}"
        raise config.error("models", f"{config.merge_method} takes {want} models counting base_model, got {n_inputs}")
    for param in spec.params:
        if not param.required:
            continue
        if param.scope is Scope.SHARED:
            if param.name not in config.parameters:
                raise config.error(f"parameters.{param.name}", f"required by {config.merge_method}")
            continue
        for m in config.models:
            if param.scope is Scope.NON_BASE and m.path == config.base_model:
                continue
            if param.name not in m.parameters and param.name not in config.parameters:
                raise config.error(f"{m.key}.parameters.{param.name}", f"required by {config.merge_method}")
        if config.base_model is not None and config.base_model not in paths and param.scope is Scope.INPUT \
                and param.name not in config.parameters:
            raise config.error(f"parameters.{param.name}", f"required by {config.merge_method} for base_model "
                               "(it is merged as one more input; list it under models: to give it its own value)")


def load_merge_config(path: str | Path) -> MergeConfig:
    """Read and validate a mergekit-style merge YAML file."""
    path = Path(path)
    try:
        data = load_yaml(path.read_text())
    except OSError as e:
        raise MergeConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise MergeConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    return parse_merge_config(data, path)
