"""The task-arithmetic family: merge the deltas `θ_i − θ_base`, optionally sparsified and sign-elected.

This is mergekit's "generalized task arithmetic" recipe, which `task_arithmetic`, `ties`, `dare_linear`,
`dare_ties` and `magnitude_prune` instantiate with different sparsifiers and defaults:

1. δ_i = θ_i − θ_base, sparsified to `density` (TIES: by magnitude; DARE: at random), optionally
   rescaled to keep its L1 norm (`rescale`);
2. δ_i ← weight_i · δ_i;
3. with sign consensus (TIES), keep in each coordinate only the δ_i whose sign agrees with the sign of
   Σ_i δ_i, and divide by the sum of the weights of the kept entries (`normalize`); without it, sum all
   δ_i and divide by Σ weight_i (`normalize`);
4. θ = θ_base + lambda · Σ.

Steps 2-4 are elementwise, so they run chunk by chunk (see `sparsify.CHUNK`) into the base's own
buffer: besides the inputs, memory in flight is a few chunk-sized temporaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graft.merge.base import TensorTask
from graft.merge.sparsify import MagnitudeSurvivors, RandomSurvivors, Survivors, chunks

SurvivorsFn = Callable[[torch.Tensor, float, torch.Generator], Survivors]


def magnitude_survivors(delta: torch.Tensor, density: float, generator: torch.Generator) -> Survivors:
    """TIES' trim (deterministic: the generator is unused)."""
    return MagnitudeSurvivors(delta, density)


def random_survivors(delta: torch.Tensor, density: float, generator: torch.Generator) -> Survivors:
    """DARE's random drop."""
    return RandomSurvivors(delta, density, generator)


def merge_task_vectors(task: TensorTask, sparsify: SurvivorsFn | None, consensus: bool) -> torch.Tensor:
    """Merge `task.tensors` into `task.base` as described in the module docstring (in place)."""
    base = task.base
    assert base is not None, "task-arithmetic methods are planned with a base"
    if not task.tensors:
        return base
    flat_base = base.view(-1)
    weights = [float(p["weight"]) for p in task.model_params]
    survivors = []
    for i, tensor in enumerate(task.tensors):
        delta = tensor.view(-1).sub_(flat_base)
        s = sparsify(delta, float(task.model_params[i]["density"]), task.generator(i)) if sparsify else Survivors(delta)
        if sparsify and task.params["rescale"]:
            s.rescale_l1()
        survivors.append(s)

    normalize = bool(task.params["normalize"])
    lam = float(task.params["lambda"])
    total_weight = torch.tensor(weights, dtype=flat_base.dtype).sum().item()
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    for s in chunks(flat_base.numel()):
        deltas = []
        for w, sv in zip(weights, survivors):
            d = sv.delta[s]
            keep = sv.keep(s)
            if keep is not None:
                d.mul_(keep)
            if sv.scale != 1.0:
                d.mul_(sv.scale)
            deltas.append(d.mul_(w))
        mixed = deltas[0].clone()
        for d in deltas[1:]:
            mixed.add_(d)
        if consensus:
            positive = mixed >= 0  # the elected sign per coordinate: the sign of the summed weighted deltas
            mixed.zero_()
            divisor = torch.zeros_like(mixed) if normalize else None
            for w, d in zip(weights, deltas):
                agree = torch.where(positive, d > 0, d < 0)
                mixed.add_(d.mul_(agree))
                if divisor is not None:
                    divisor.add_(agree, alpha=w)
            if divisor is not None:
                mixed.div_(divisor.masked_fill_(divisor == 0, 1))
        elif normalize:
            mixed.div_(plain_divisor)
        if lam != 1:
            mixed.mul_(lam)
        flat_base[s].add_(mixed)
    return base
