"""`linear`: a weighted average of the input models (model soups, Wortsman et al. 2022).

θ = Σ_i weight_i · θ_i, divided by Σ_i weight_i when `normalize` (mergekit's default: true). The
base model, if named, is simply one more input. Computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from graft.merge.base import BasePolicy, Param, Scope, TensorTask, merge_method


@merge_method("linear", params=(Param("weight", float, scope=Scope.INPUT), Param("normalize", bool, True)),
              base=BasePolicy.IGNORED)
def linear(task: TensorTask) -> torch.Tensor:
    """Weighted sum of all inputs, normalized by the weight total when `normalize`."""
    weights = [float(p["weight"]) for p in task.model_params]
    result = task.tensors[0].mul_(weights[0])
    for w, tensor in zip(weights[1:], task.tensors[1:]):
        result.add_(tensor, alpha=w)
    if task.params["normalize"]:
        result.div_(torch.tensor(weights, dtype=result.dtype).sum().item())
    return result
