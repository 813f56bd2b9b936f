"""`slerp`: spherical interpolation between the base and one other model, tensor by tensor.

Each tensor is treated as one flat vector: with cos Ω = <a, b> / (|a| |b|) (a = base, b = other),
θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, and plain linear interpolation when the two are nearly
(anti)parallel (|cos Ω| > 0.9995), as mergekit does. t = 0 gives the base. Norms at or below 1e-8 count
as 1 (so zero tensors fall back gracefully). Computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch

from graft.merge.base import BasePolicy, Param, TensorTask, merge_method

DOT_THRESHOLD = 0.9995  # above this |cos Ω| the arc is too flat for sin Ω: interpolate linearly
NORM_EPS = 1e-8


@merge_method("slerp", params=(Param("t", float),), base=BasePolicy.REQUIRED, min_inputs=2, max_inputs=2)
def slerp(task: TensorTask) -> torch.Tensor:
    """Spherical interpolation from `task.base` (t=0) to the other input (t=1)."""
    a, b = task.base, task.tensors[0]
    assert a is not None
    t = float(task.params["t"])
    if a.numel() == 0:
        return a
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    norm_a = norm_a if norm_a > NORM_EPS else 1.0
    norm_b = norm_b if norm_b > NORM_EPS else 1.0
    dot = float(torch.dot(a.reshape(-1), b.reshape(-1))) / norm_a / norm_b
    dot = min(1.0, max(-1.0, dot))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1.0 - t, t
    else:
        theta = math.acos(dot)
        coef_a = math.sin((1.0 - t) * theta) / math.sin(theta)
        coef_b = math.sin(t * theta) / math.sin(theta)
    return a.mul_(coef_a).add_(b, alpha=coef_b)
