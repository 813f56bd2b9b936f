"""Which entries of a task vector survive: the largest magnitudes (TIES) or a random subset (DARE).

Semantics of mergekit 0.1.5: magnitude pruning keeps exactly `max(1, int(density * n))` entries,
random pruning keeps each entry with probability `density`, and `rescale` multiplies the survivors so
that the tensor's L1 norm is unchanged (1/density in expectation for DARE). `density >= 1` keeps all.

Ties at the magnitude threshold: exactly k entries survive, so when more entries than that reach the
k-th largest magnitude, some entries equal to it are dropped. Here the lowest flat indices win (`top_k_mask`,
`MagnitudeSurvivors`): the mask is a function of the values alone, the same whether the tensor is
streamed or whole, on any machine. mergekit keeps the first k of `torch.argsort(|delta|, descending=True)`,
which is not a stable sort, so which tied entries it keeps is unspecified. The two tools can therefore
disagree on exactly those entries; `benchmarks/merge_speed.py` counts every difference and checks that
each one is such a tie.

Speed and memory: a full sort of a 25M-entry tensor costs seconds on CPU, so the k-th largest
magnitude is found exactly by bracketing it with a small random sample and selecting inside the
bracket; and every pass runs over cache-sized chunks (`CHUNK`) of a `Flat` source, so a task vector
need not be in memory at all (the executor reads it from the checkpoints chunk by chunk) and
temporaries never cost a fresh, page-faulting allocation the size of the tensor. For a big tensor the
bracket can even come first (`Bracket`, from `RUNS` short runs of the tensor): entries above it
survive and entries below it do not whatever the exact threshold is, so a merge can run in the same
pass that counts and collects what falls inside, and settle only those entries afterwards
(`graft.merge.task_vectors.merge_trimmed`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from graft.merge.base import Flat

CHUNK = 1 << 18  # elements per chunk (1 MiB of fp32): big enough that per-op overhead is small, temporaries stay in L2-L3
EXACT_SELECT_MAX = 1 << 20  # below this size torch.kthvalue on the whole tensor is cheap enough
SAMPLE = 1 << 16  # sample size used to bracket the k-th largest magnitude of a big tensor
RESCALE_EPS = 1e-7  # mergekit leaves a tensor unscaled when either L1 norm is below this
RUNS, RUN = 32, 2048  # a bracket's sample: RUNS contiguous runs of RUN entries (one read each per file)
BRACKET_MIN = 8 * RUNS * RUN  # from this size a tensor's threshold is bracketed before its merge pass


def chunks(n: int) -> list[slice]:
    """Consecutive slices covering range(n), CHUNK elements each (fixed, so random draws are reproducible)."""
    return [slice(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def _flat(source: torch.Tensor | Flat) -> Flat:
    return source if isinstance(source, Flat) else Flat.of(source)


def kth_largest_abs(source: torch.Tensor | Flat, k: int) -> tuple[torch.Tensor, int]:
    """(t, c): t is the k-th largest |x| of a flat tensor (exact) and c how many entries have |x| >= t."""
    src = _flat(source)
    n = src.numel
    if n <= EXACT_SELECT_MAX:
        mag = src.read(slice(0, n)).abs()
        t = torch.kthvalue(mag, n - k + 1).values
        return t, int(torch.count_nonzero(mag >= t))
    gen = torch.Generator().manual_seed(n)
    picks = torch.randint(n, (SAMPLE,), generator=gen).sort().values
    bounds = torch.searchsorted(picks, torch.tensor([c.start for c in chunks(n)] + [n]))
    parts = []
    for i, s in enumerate(chunks(n)):
        if bounds[i + 1] > bounds[i]:
            parts.append(src.read(s)[picks[bounds[i]:bounds[i + 1]] - s.start].abs())
    sample = torch.cat(parts).sort().values
    q = 1.0 - k / n
    margin = 6.0 * math.sqrt(q * (1.0 - q) / SAMPLE) + 4.0 / SAMPLE  # ~6 sigma of the sample quantile
    lo = sample[max(0, int((q - margin) * SAMPLE))]
    hi = sample[min(SAMPLE - 1, math.ceil((q + margin) * SAMPLE))]
    above, inside = 0, []
    for s in chunks(n):
        a = src.read(s).abs()
        above += int(torch.count_nonzero(a > hi))
        inside.append(a[(a >= lo) & (a <= hi)])
    window = torch.cat(inside)
    rank = k - above  # rank of the answer within the bracket, counted from the top
    if not 1 <= rank <= window.numel():  # the bracket missed (vanishingly rare): exact but slow
        mag = src.read(slice(0, n)).abs()
        t = torch.kthvalue(mag, n - k + 1).values
        return t, int(torch.count_nonzero(mag >= t))
    t = torch.kthvalue(window, window.numel() - rank + 1).values
    return t, above + int(torch.count_nonzero(window >= t))


def sample_runs(n: int) -> list[slice]:
    """`RUNS` runs of `RUN` consecutive entries at random places in range(n) (seeded by n: reproducible), sorted."""
    gen = torch.Generator().manual_seed(n)
    starts = torch.randint(n - RUN + 1, (RUNS,), generator=gen).sort().values.tolist()
    return [slice(s, s + RUN) for s in starts]


@dataclass(frozen=True)
class Bracket:
    """An interval [lo, hi] that holds the k-th largest |x| of a tensor with overwhelming probability.

    Built from a sample of runs (`sample_runs`): runs are cheap to read but their entries are
    correlated (one row of a matrix may be larger than the rest), so the margin is six standard errors
    of the quantile estimated from the spread between runs, and never less than six for independent
    draws. A miss is detected afterwards (`resolve`), never assumed away.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    k: int

    @staticmethod
    def of(sample: torch.Tensor, k: int, n: int) -> "Bracket":
        """`sample`: |x| at the runs, one row per run; k of n entries are to survive."""
        runs, m = sample.shape[0], sample.numel()
        values = sample.reshape(-1)

        def nth(i: int) -> torch.Tensor:  # the i-th smallest of the sample, from 0
            return torch.kthvalue(values, min(m, max(1, i + 1))).values

        q = 1.0 - k / n
        share_above = (sample >= nth(int(q * m))).float().mean(dim=1)  # per run
        between = float(share_above.std()) / math.sqrt(runs) if runs > 1 else 1.0
        margin = 6.0 * max(between, math.sqrt(q * (1.0 - q) / m)) + 4.0 / m
        return Bracket(nth(int((q - margin) * m)), nth(math.ceil((q + margin) * m)), k)

    def resolve(self, above: int, window: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The exact threshold and the flat indices of the surplus ties it drops, or None if the bracket missed.

        `above`: how many |x| exceed hi; `window`: every |x| inside [lo, hi]; `where`: their flat
        indices, ascending. The surplus ties go from the highest index down, as in `MagnitudeSurvivors`.
        """
        rank = self.k - above  # the answer's rank within the window, from the top
        if not 1 <= rank <= window.numel():
            return None
        t = torch.kthvalue(window, window.numel() - rank + 1).values
        ties = where[window == t]
        surplus = above + int(torch.count_nonzero(window >= t)) - self.k
        return t, ties[ties.numel() - surplus:] if surplus > 0 else ties[:0]


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly `k` largest entries of a non-negative tensor.

    Among entries tied at the k-th largest value the lowest flat indices win, so the mask is
    deterministic (mergekit's unstable argsort keeps an unspecified subset of them).
    """
    flat = magnitude.reshape(-1)
    threshold, count = kth_largest_abs(flat, k)
    keep = flat >= threshold
    if count > k:
        ties = (flat == threshold).nonzero().view(-1)
        keep[ties[ties.numel() - (count - k):]] = False
    return keep.view(magnitude.shape)


class Survivors:
    """Which entries of one flat task vector survive, chunk by chunk: `values * keep(s, values) * scale`."""

    def __init__(self, delta: Flat) -> None:
        self.delta = delta
        self.scale = 1.0

    def keep(self, s: slice, values: torch.Tensor) -> torch.Tensor | None:
        """Boolean mask of the survivors among `values` = chunk `s` of the delta (None: all survive)."""
        return None

    def rescale_l1(self) -> None:
        """Scale the survivors so the L1 norm of the tensor is what it was before dropping (mergekit's rescale)."""
        before, after = 0.0, 0.0
        for s in chunks(self.delta.numel):
            a = self.delta.read(s).abs()
            before += float(a.sum())
            keep = self.keep(s, a)
            after += float(a.mul_(keep).sum()) if keep is not None else float(a.sum())
        if before >= RESCALE_EPS and after >= RESCALE_EPS:
            self.scale = before / after


class MagnitudeSurvivors(Survivors):
    """The `max(1, int(density * n))` largest |delta| survive, exactly that many.

    When more entries reach the threshold than there are places, the surplus ties are dropped from
    the highest flat indices down (the lowest indices win, as in `top_k_mask`): deterministic, where
    mergekit's choice among them is not.
    """

    def __init__(self, delta: Flat, density: float) -> None:
        super().__init__(delta)
        n = delta.numel
        self.threshold: torch.Tensor | None = None
        self.nothing = density <= 0 and n > 0
        self.dropped: dict[int, torch.Tensor] = {}  # chunk start -> indices (within the chunk) of surplus ties
        if density >= 1 or n == 0 or self.nothing:
            return
        k = max(1, int(density * n))
        self.threshold, count = kth_largest_abs(delta, k)
        surplus = count - k
        for s in reversed(chunks(n)):
            if surplus <= 0:
                break
            ties = (delta.read(s).abs() == self.threshold).nonzero().view(-1)
            drop = ties[max(0, ties.numel() - surplus):]
            if drop.numel():
                self.dropped[s.start] = drop
            surplus -= drop.numel()

    def keep(self, s: slice, values: torch.Tensor) -> torch.Tensor | None:
        if self.nothing:
            return torch.zeros(values.shape, dtype=torch.bool)
        if self.threshold is None:
            return None
        mask = values.abs() >= self.threshold
        drop = self.dropped.get(s.start)
        if drop is not None:
            mask[drop] = False
        return mask


class RandomSurvivors(Survivors):
    """Each entry survives with probability `density`, drawn chunk by chunk from `generator`."""

    def __init__(self, delta: Flat, density: float, generator: torch.Generator) -> None:
        super().__init__(delta)
        self.mask: torch.Tensor | None = None
        if density >= 1:
            return
        self.mask = torch.empty(delta.numel, dtype=torch.bool)
        draw = torch.empty(min(CHUNK, delta.numel), dtype=torch.float32)
        for s in chunks(delta.numel):
            u = draw[: s.stop - s.start]
            torch.rand(u.shape, generator=generator, out=u)
            torch.lt(u, density, out=self.mask[s])

    def keep(self, s: slice, values: torch.Tensor) -> torch.Tensor | None:
        return None if self.mask is None else self.mask[s]


def magnitude_(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Whole-tensor form of TIES' trim, in place (used by tests and by callers outside the executor)."""
    return _apply(MagnitudeSurvivors(Flat.of(delta), density), rescale, delta)


def random_(delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Whole-tensor form of DARE's drop (and rescale), in place."""
    return _apply(RandomSurvivors(Flat.of(delta), density, generator), rescale, delta)


def _apply(survivors: Survivors, rescale: bool, delta: torch.Tensor) -> torch.Tensor:
    if rescale:
        survivors.rescale_l1()
    flat = delta.view(-1)
    for s in chunks(flat.numel()):
        keep = survivors.keep(s, flat[s])
        if keep is not None:
            flat[s].mul_(keep)
    return delta.mul_(survivors.scale) if survivors.scale != 1.0 else delta
