"""`task_arithmetic`: add weighted task vectors to the base (Ilharco et al. 2023, arXiv 2212.04089).

θ = θ_base + lambda · Σ_i weight_i (θ_i − θ_base), divided by Σ weight_i only when `normalize`
(mergekit's default: false). No sparsification; `density` is accepted and ignored, as in mergekit.
"""

from __future__ import annotations

import torch

from graft.merge.base import TensorTask, merge_method, task_arithmetic_params
from graft.merge.task_vectors import merge_task_vectors


@merge_method("task_arithmetic", params=task_arithmetic_params(normalize=False, rescale=False), streams_base=True)
def task_arithmetic(task: TensorTask) -> torch.Tensor:
    """Base plus the weighted sum of the deltas."""
    return merge_task_vectors(task, sparsify=None, consensus=False)
