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

Steps 2-4 are elementwise, so they run chunk by chunk (see `sparsify.CHUNK`): besides the inputs,
memory in flight is a few chunk-sized temporaries. Inputs and base are only ever read chunk by chunk
(`Flat`), so when the executor streams them from the checkpoints the only whole tensor in memory
is the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from graft.merge.base import Flat, TensorTask
from graft.merge.sparsify import MagnitudeSurvivors, RandomSurvivors, Survivors, chunks

SurvivorsFn = Callable[[Flat, float, torch.Generator], Survivors]


def magnitude_survivors(delta: Flat, density: float, generator: torch.Generator) -> Survivors:
    """TIES' trim (deterministic: the generator is unused)."""
    return MagnitudeSurvivors(delta, density)


def random_survivors(delta: Flat, density: float, generator: torch.Generator) -> Survivors:
    """DARE's random drop."""
    return RandomSurvivors(delta, density, generator)


def _delta(model: Flat, base: Flat) -> Flat:
    """θ_i − θ_base, chunk by chunk (a fresh tensor per read, which the caller may modify)."""
    return Flat(model.numel, model.dtype, lambda s: model.read(s).sub(base.read(s)))


def merge_task_vectors(task: TensorTask, sparsify: SurvivorsFn | None, consensus: bool) -> torch.Tensor:
    """Merge the task's inputs onto its base as described in the module docstring; a new tensor
    (flat when the base was streamed: the executor knows the shape)."""
    base = task.base_flat
    assert base is not None, "task-arithmetic methods are planned with a base"
    out = torch.empty(base.numel, dtype=base.dtype)
    weights = [float(p["weight"]) for p in task.model_params]
    survivors = []
    for i, model in enumerate(task.inputs):
        delta = _delta(model, base)
        sv = sparsify(delta, float(task.model_params[i]["density"]), task.generator(i)) if sparsify else Survivors(delta)
        if sparsify and task.params["rescale"]:
            sv.rescale_l1()
        survivors.append(sv)

    normalize = bool(task.params["normalize"])
    lam = float(task.params["lambda"])
    total_weight = torch.tensor(weights, dtype=out.dtype).sum().item()
    plain_divisor = 1.0 if abs(total_weight) < 1e-8 else total_weight
    for s in chunks(base.numel):
        mixed = out[s].copy_(base.read(s))
        if not survivors:
            continue
        deltas = []
        for w, sv in zip(weights, survivors):
            d = sv.delta.read(s)
            keep = sv.keep(s, d)
            if keep is not None:
                d.mul_(keep)
            if sv.scale != 1.0:
                d.mul_(sv.scale)
            deltas.append(d.mul_(w))
        total = deltas[0].clone()
        for d in deltas[1:]:
            total.add_(d)
        if consensus:
            positive = total >= 0  # the elected sign per coordinate: the sign of the summed weighted deltas
            total.zero_()
            divisor = torch.zeros_like(total) if normalize else None
            for w, d in zip(weights, deltas):
                agree = torch.where(positive, d > 0, d < 0)
                total.add_(d.mul_(agree))
                if divisor is not None:
                    divisor.add_(agree, alpha=w)
            if divisor is not None:
                total.div_(divisor.masked_fill_(divisor == 0, 1))
        elif normalize:
            total.div_(plain_divisor)
        if lam != 1:
            total.mul_(lam)
        mixed.add_(total)
    return out.view(task.base.shape) if task.base is not None else out
