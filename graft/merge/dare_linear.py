"""`dare_linear`: DARE (Yu et al. 2023, arXiv 2311.03099) drop-and-rescale, then task arithmetic.

Each delta entry survives with probability `density`; with `rescale` (mergekit's default: true) the
survivors are scaled to keep the delta's L1 norm, which is 1/density in expectation. Random: the draw
for a tensor is seeded from the run's seed and the tensor's name (see `TensorTask.generator`).
"""

from __future__ import annotations

import torch

from graft.merge.base import TensorTask, merge_method, task_arithmetic_params
from graft.merge.task_vectors import merge_task_vectors, random_survivors


@merge_method("dare_linear", params=task_arithmetic_params(normalize=False, rescale=True), streams_base=True)
def dare_linear(task: TensorTask) -> torch.Tensor:
    """Randomly dropped and rescaled deltas, summed with their weights."""
    return merge_task_vectors(task, sparsify=random_survivors, consensus=False)
