"""`ties`: TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint merge.

Each delta keeps its top-`density` entries by magnitude; per coordinate the sign of the summed weighted
deltas is elected and only agreeing deltas are kept; with `normalize` (mergekit's default: true) the sum
is divided by the total weight of the kept deltas. `rescale` (default false) restores each trimmed
delta's L1 norm.
"""

from __future__ import annotations

import torch

from graft.merge.base import TensorTask, merge_method, task_arithmetic_params
from graft.merge.task_vectors import merge_trimmed


@merge_method("ties", params=task_arithmetic_params(normalize=True, rescale=False), streams_base=True)
def ties(task: TensorTask) -> torch.Tensor:
    """Magnitude-trimmed, sign-elected merge of the deltas."""
    return merge_trimmed(task, consensus=True)
