"""`magnitude_prune`: trim each delta by magnitude as TIES does, then plain task arithmetic (no sign election).

mergekit 0.1.5 no longer registers this name; graftline keeps it with the semantics of mergekit's
earlier `magnitude_prune` (the task-arithmetic recipe with magnitude sparsification, `normalize` and
`rescale` both defaulting to false), so older YAML files still run.
"""

from __future__ import annotations

import torch

from graft.merge.base import TensorTask, merge_method, task_arithmetic_params
from graft.merge.task_vectors import merge_trimmed


@merge_method("magnitude_prune", params=task_arithmetic_params(normalize=False, rescale=False), streams_base=True)
def magnitude_prune(task: TensorTask) -> torch.Tensor:
    """Magnitude-trimmed deltas summed with their weights."""
    return merge_trimmed(task, consensus=False)
