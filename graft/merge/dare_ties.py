"""`dare_ties`: DARE's random drop-and-rescale followed by TIES' sign election.

Defaults as in mergekit: `rescale` true, `normalize` false.
"""

from __future__ import annotations

import torch

from graft.merge.base import TensorTask, merge_method, task_arithmetic_params
from graft.merge.task_vectors import merge_task_vectors, random_survivors


@merge_method("dare_ties", params=task_arithmetic_params(normalize=False, rescale=True), streams_base=True)
def dare_ties(task: TensorTask) -> torch.Tensor:
    """Randomly dropped deltas, sign-elected and summed."""
    return merge_task_vectors(task, sparsify=random_survivors, consensus=True)
