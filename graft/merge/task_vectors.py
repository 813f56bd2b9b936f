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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from graft.merge.base import Flat, TensorTask
from graft.merge.sparsify import BRACKET_MIN, Bracket, MagnitudeSurvivors, RandomSurvivors, Survivors, chunks, sample_runs

SurvivorsFn = Callable[[Flat, float, torch.Generator], Survivors]
T = TypeVar("T")


def magnitude_survivors(delta: Flat, density: float, generator: torch.Generator) -> Survivors:
    """TIES' trim (deterministic: the generator is unused)."""
    return MagnitudeSurvivors(delta, density)


def random_survivors(delta: Flat, density: float, generator: torch.Generator) -> Survivors:
    """DARE's random drop."""
    return RandomSurvivors(delta, density, generator)


def _delta(model: Flat, base: Flat) -> Flat:
    """θ_i − θ_base, chunk by chunk (a fresh tensor per read, which the caller may modify)."""
    return Flat(model.numel, model.dtype, lambda s: model.read(s).sub(base.read(s)))


def _each_chunk(task: TensorTask, fn: Callable[[slice], T], n: int) -> list[T]:
    """`fn` over the chunks of range(n), in order; on `task.threads` threads when the executor gave
    more than one (chunks write disjoint slices, so they may run in any order)."""
    if task.threads <= 1:
        return [fn(s) for s in chunks(n)]
    with ThreadPoolExecutor(max_workers=task.threads, thread_name_prefix="graft-chunks") as pool:
        return list(pool.map(fn, chunks(n)))


def _mask(compare: Callable[..., torch.Tensor], x: torch.Tensor, other: float | torch.Tensor) -> torch.Tensor:
    """`compare(x, other)` as 1.0/0.0 in x's dtype: on CPU a float mask costs a quarter of a bool one
    to make and a tenth to multiply by (measured, float32)."""
    return compare(x, other, out=torch.empty_like(x))


@dataclass(frozen=True)
class _Mix:
    """Steps 2-4 of the recipe for one tensor: the per-input weights and scales, and how deltas combine."""

    weights: list[float]
    scales: list[float]
    consensus: bool
    normalize: bool
    lam: float
    plain_divisor: float  # Σ weight_i in the compute dtype (1 if it is about 0): `normalize` without consensus

    @staticmethod
    def of(task: TensorTask, consensus: bool, scales: list[float], dtype: torch.dtype) -> "_Mix":
        weights = [float(p["weight"]) for p in task.model_params]
        weight = torch.tensor(weights, dtype=dtype).sum().item()
        return _Mix(weights, scales, consensus, bool(task.params["normalize"]), float(task.params["lambda"]),
                    1.0 if abs(weight) < 1e-8 else weight)

    def total(self, deltas: list[torch.Tensor], keeps: list[torch.Tensor | None]) -> torch.Tensor:
        """λ · the combined deltas at some entries (the deltas are modified in place). Elementwise,
        so the same numbers for a chunk or for a gather of scattered entries."""
        for d, keep, scale, w in zip(deltas, keeps, self.scales, self.weights):
            if keep is not None:
                d.mul_(keep)
            if scale != 1.0:
                d.mul_(scale)
            if w != 1.0:
                d.mul_(w)
        total = deltas[0].add(deltas[1]) if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            total.add_(d)
        if self.consensus:
            # The elected sign per coordinate, +1 where Σ >= 0. copysign reads -1 at Σ = -0.0, but a sum is -0.0 only
            # when every term is a zero, which agrees with neither sign: the result is the same.
            sign = torch.copysign(torch.ones((), dtype=total.dtype), total)
            divisor = None
            for i, (w, d) in enumerate(zip(self.weights, deltas)):
                agree = _mask(torch.gt, d.mul(sign), 0)
                if i == 0:
                    total = d.mul_(agree)
                    divisor = agree.mul_(w) if self.normalize else None
                else:
                    total.addcmul_(d, agree)
                    if divisor is not None:
                        divisor.add_(agree, alpha=w)
            if divisor is not None:
                total.div_(divisor.add_(_mask(torch.eq, divisor, 0)))  # 0 (nothing agrees) divides by 1
        elif self.normalize:
            total.div_(self.plain_divisor)
        return total.mul_(self.lam) if self.lam != 1 else total


def merge_task_vectors(task: TensorTask, sparsify: SurvivorsFn | None, consensus: bool) -> torch.Tensor:
    """Merge the task's inputs onto its base as described in the module docstring; a new tensor
    (flat when the base was streamed: the executor knows the shape)."""
    base = task.base_flat
    assert base is not None, "task-arithmetic methods are planned with a base"
    out = torch.empty(base.numel, dtype=base.dtype)
    survivors = []
    for i, model in enumerate(task.inputs):
        delta = _delta(model, base)
        sv = sparsify(delta, float(task.model_params[i]["density"]), task.generator(i)) if sparsify else Survivors(delta)
        if sparsify and task.params["rescale"]:
            sv.rescale_l1()
        survivors.append(sv)
    mix = _Mix.of(task, consensus, [sv.scale for sv in survivors], out.dtype)
    inputs = task.inputs

    def merge_chunk(s: slice) -> None:
        b = base.read(s)
        if not survivors:
            out[s].copy_(b)
            return
        deltas = [model.read(s).sub(b) for model in inputs]
        torch.add(b, mix.total(deltas, [sv.keep(s, d) for sv, d in zip(survivors, deltas)]), out=out[s])

    _each_chunk(task, merge_chunk, base.numel)
    return out.view(task.base.shape) if task.base is not None else out


def merge_trimmed(task: TensorTask, consensus: bool) -> torch.Tensor:
    """`merge_task_vectors` with TIES' trim, in one pass over the inputs of a big tensor.

    Each delta's threshold is bracketed first from a sample (`Bracket`). The pass then merges every
    entry as if the entries inside a bracket were dropped, counts those above it and keeps the values
    of each coordinate where any delta falls inside its bracket. The exact thresholds follow from
    those counts and values, and only the kept coordinates are merged again: the result is the
    same as `merge_task_vectors(task, magnitude_survivors, consensus)`, which this falls back to for
    small tensors, `rescale`, a density outside (0, 1), or a missed bracket (exact, one more pass).
    """
    base = task.base_flat
    assert base is not None, "task-arithmetic methods are planned with a base"
    n, inputs = base.numel, task.inputs
    densities = [float(p["density"]) for p in task.model_params]
    if n < BRACKET_MIN or task.params["rescale"] or not inputs or not all(0 < d < 1 for d in densities):
        return merge_task_vectors(task, magnitude_survivors, consensus)
    runs = sample_runs(n)
    at_runs = [base.read(r) for r in runs]
    brackets = [Bracket.of(torch.stack([m.read(r).sub(b) for r, b in zip(runs, at_runs)]).abs_(),
                           max(1, int(d * n)), n) for m, d in zip(inputs, densities)]
    out = torch.empty(n, dtype=base.dtype)
    mix = _Mix.of(task, consensus, [1.0] * len(inputs), out.dtype)

    def merge_chunk(s: slice) -> tuple[list[int], list[torch.Tensor]]:
        """Merge chunk `s` as if every entry inside a bracket were dropped; return how many entries of
        each delta are above its bracket, and the flat indices, base and deltas where any is inside."""
        b = base.read(s)
        deltas = [m.read(s).sub(b) for m in inputs]
        keeps, above, unsettled = [], [], None
        for d, br in zip(deltas, brackets):
            a = d.abs()
            keep = _mask(torch.gt, a, br.hi)
            above.append(int(keep.sum()))
            inside = _mask(torch.ge, a, br.lo).sub_(keep)
            unsettled = inside if unsettled is None else unsettled.add_(inside)
            keeps.append(keep)
        idx = unsettled.nonzero().view(-1)
        kept = [idx + s.start, *(t[idx] for t in (b, *deltas))]
        torch.add(b, mix.total(deltas, keeps), out=out[s])
        return above, kept

    parts = _each_chunk(task, merge_chunk, n)
    above = [sum(counts) for counts in zip(*(p[0] for p in parts))]
    where, b, *deltas = (torch.cat(column) for column in zip(*(p[1] for p in parts)))
    keeps = []
    for d, br, above_i in zip(deltas, brackets, above):
        a = d.abs()
        inside = (a >= br.lo) & (a <= br.hi)
        settled = br.resolve(above_i, a[inside], where[inside])
        if settled is None:  # the sample misled the bracket: redo this tensor the exact way
            return merge_task_vectors(task, magnitude_survivors, consensus)
        threshold, dropped = settled
        keep = a >= threshold
        keep[torch.searchsorted(where, dropped)] = False
        keeps.append(keep)
    if where.numel():
        out[where] = b.add_(mix.total(deltas, keeps))
    return out.view(task.base.shape) if task.base is not None else out
