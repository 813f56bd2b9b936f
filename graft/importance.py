"""Per-parameter importance scores, registered by name, computed shard by shard and combined exactly.

A score function sees a model, an iterable of batches (one data shard) and the names of the parameters to
score, and returns an `ImportancePartial`: running sums plus the number of terms. Partials from any split
of the data add up to exactly the partial of the whole data, so scoring fans out over shards and reduces by `+`.

Only the named parameters are scored (`keys`; None: every parameter): for a SkillPack, what its expert's
delta touches (an adapter's target modules), not the whole model. Only those parameters take gradients,
so an 8B model's scoring holds gradients and float32 sums of its adapted matrices, not of all 8B weights.

- `magnitude`: |θ| (needs no data);
- `fisher`: the diagonal of the empirical Fisher, the mean squared gradient of the loss;
- `snip`: SNIP / first-order Taylor saliency, the mean of |g ⊙ θ|.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graft.registry import Registry


@dataclass
class ImportancePartial:
    """Sums of per-term importance and how many terms went in; `+` combines shards exactly."""

    sums: dict[str, torch.Tensor]
    count: int

    def __add__(self, other: "ImportancePartial") -> "ImportancePartial":
        if self.sums.keys() != other.sums.keys():
            raise ValueError("cannot combine importance partials over different parameters")
        return ImportancePartial({k: self.sums[k] + other.sums[k] for k in self.sums}, self.count + other.count)

    def finalize(self) -> dict[str, torch.Tensor]:
        if self.count == 0:
            raise ValueError("importance partial holds no terms")
        return {k: v / self.count for k, v in self.sums.items()}


ScoreFn = Callable[[torch.nn.Module, Iterable[dict[str, torch.Tensor]], Collection[str] | None], ImportancePartial]
SCORES: Registry[ScoreFn] = Registry("importance score")


def scored_parameters(model: torch.nn.Module, keys: Collection[str] | None) -> dict[str, torch.nn.Parameter]:
    """The floating-point parameters named by `keys` (None: all of them); a key the model lacks is a ValueError."""
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    if keys is None:
        return params
    missing = sorted(set(keys) - set(params))
    if missing:
        raise ValueError(f"cannot score tensor {missing[0]!r}: not a floating-point parameter of the model")
    return {n: params[n] for n in keys}


def _gradient_terms(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], keys: Collection[str] | None,
                    term: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> ImportancePartial:
    params = scored_parameters(model, keys)
    every = dict(model.named_parameters())
    wanted = {n: every[n].requires_grad for n in every}  # restored afterwards
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()  # no dropout: scores are a property of the weights, not of a noise draw
    for n, p in every.items():
        p.requires_grad_(n in params)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += term(p.grad.float(), p.detach().float())
            count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for n, p in every.items():
            p.requires_grad_(wanted[n])
    return ImportancePartial(sums, count)


@SCORES.register("fisher")
def fisher(model, batches, keys=None) -> ImportancePartial:
    return _gradient_terms(model, batches, keys, lambda g, w: g.pow(2))


@SCORES.register("snip")
def snip(model, batches, keys=None) -> ImportancePartial:
    return _gradient_terms(model, batches, keys, lambda g, w: (g * w).abs())


@SCORES.register("magnitude")
def magnitude(model, batches, keys=None) -> ImportancePartial:
    return ImportancePartial({n: p.detach().float().abs() for n, p in scored_parameters(model, keys).items()}, 1)


def save_scores(scores: dict[str, torch.Tensor], path: str | Path, method: str, count: int) -> None:
    save_file({k: v.contiguous() for k, v in scores.items()}, str(path),
              metadata={"graftline.score": method, "graftline.count": str(count)})


def load_scores(path: str | Path) -> dict[str, torch.Tensor]:
    """Scores saved by `save_scores`; a file that is not safetensors is a ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error type for a file it cannot parse
        raise ValueError(f"{path}: not a safetensors scores file ({e})") from None


def module_summary(scores: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per-tensor mean, max and share of the total importance mass, largest share first."""
    total = sum(float(v.sum()) for v in scores.values()) or 1.0
    rows = {k: {"mean": float(v.mean()), "max": float(v.max()), "share": float(v.sum()) / total}
            for k, v in scores.items()}
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]["share"]))
