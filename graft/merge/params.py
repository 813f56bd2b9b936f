"""Resolve a method's parameters for one tensor: filters, layer gradients, precedence and defaults.

Semantics follow mergekit 0.1.5: a model's own `parameters` take precedence over the global
`parameters:` for per-model values; shared values (normalize, lambda, t, ...) come from the global
block only. A gradient `[v0, ..., vn]` is interpolated at t = layer / (num_layers − 1) (t = 0 for
tensors outside the layer stack, such as embeddings and the final norm); booleans in a gradient pick
the nearest-lower entry instead of interpolating.
"""

from __future__ import annotations

import re
from typing import Any

from graft.merge.base import Param
from graft.merge.config import Conditional

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_t(tensor_name: str, num_layers: int) -> float:
    """Position of the tensor's layer in the stack in [0, 1], used to evaluate gradients."""
    m = LAYER.search(tensor_name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(setting: Any, param: Param, tensor_name: str, t: float) -> Any:
    """The value of one setting for `tensor_name`, or None when no conditional entry matches."""
    if isinstance(setting, Conditional):
        setting = [setting]
    if not isinstance(setting, list):
        return param.validate(setting)
    if not setting:
        return None
    if isinstance(setting[0], Conditional):
        for cond in setting:
            if cond.filter in (None, "*") or cond.filter in tensor_name:
                return evaluate(cond.value, param, tensor_name, t)
        return None
    values = [param.validate(v) for v in setting]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return param.validate((1 - frac) * values[i0] + frac * values[i1])


def resolve(param: Param, scopes: list[dict[str, Any]], tensor_name: str, t: float) -> Any:
    """First non-None value among `scopes` (highest precedence first), else the default.

    Raises `KeyError(param.name)` when the parameter is required and nothing applies to this tensor.
    """
    for scope in scopes:
        if param.name in scope:
            value = evaluate(scope[param.name], param, tensor_name, t)
            if value is not None:
                return value
    if param.required:
        raise KeyError(param.name)
    return param.validate(param.default)
