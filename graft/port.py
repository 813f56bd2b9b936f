"""PortLLM (methods.md §2): a patch trained on one version of a base, carried to a later version with no training.

A patch is an expert's delta Δ (a LoRA adapter's scaled B·A, a sparse adapter's entries, or a full fine-tune's θ_ft − θ), keyed by
the base's tensor names (`graft.experts`). Porting it to the evolved base θ' is θ' + Δ: nothing trains.
This module says whether a patch fits a new base and measures what the paper's argument rests on:
- `check_fits(deltas, new_base)`: every tensor the patch changes is in θ' with Δ's shape (PortError
  names the first that is not);
- `base_drift(old, new, keys)`: per tensor, ‖θ'_k − θ_k‖_F / ‖θ_k‖_F, how far the provider moved the
  base under the patch;
- `update_gap(delta, reference)`: per tensor, ‖Δ' − Δ‖_F / ‖Δ‖_F and cos(Δ, Δ'), where Δ' is the same
  adapter trained on θ' (the paper's lemma: Δ' ≈ Δ, measured);
- `ported_model(new_base, deltas)`: θ' + Δ as a model in memory, for evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from graft.artifacts import ArtifactError
from graft.checkpoint import CheckpointReader
from graft.loading import CPU_FP32, LoadOptions, load_causal_lm
from graft.lora import LowRankDelta
from graft.skillpack import Delta
from graft.sparse import SparseDelta


class PortError(ArtifactError):
    """A patch that cannot be carried to a new base; the message names the tensor."""


def dense(delta: Delta) -> torch.Tensor:
    """A delta as a dense fp32 tensor in the base tensor's shape."""
    return delta.dense().float() if isinstance(delta, (LowRankDelta, SparseDelta)) else delta.float()


def check_fits(deltas: Mapping[str, Delta], new_base: str | Path) -> None:
    """PortError naming the first tensor of the patch that the new base lacks or holds in another shape."""
    reader = CheckpointReader(new_base)
    for key in sorted(deltas):
        module = key.removesuffix(".weight")
        if key not in reader:
            raise PortError(f"{new_base}: has no module {module!r} (tensor {key!r}) for the patch to change")
        shape = tuple(reader.shape(key))
        if shape != tuple(deltas[key].shape):
            raise PortError(f"{new_base}: module {module!r} has shape {list(shape)}, the patch changes {list(deltas[key].shape)}")


def base_drift(old_base: str | Path, new_base: str | Path, keys: list[str]) -> dict[str, float]:
    """‖θ'_k − θ_k‖_F / ‖θ_k‖_F per tensor `k` (0 for an unchanged tensor), read tensor by tensor."""
    old, new = CheckpointReader(old_base), CheckpointReader(new_base)
    out = {}
    for key in sorted(keys):
        before, after = old.get(key).float(), new.get(key).float()
        out[key] = float((after - before).norm() / before.norm().clamp_min(1e-12))
    return out


def update_gap(delta: Mapping[str, Delta], reference: Mapping[str, Delta]) -> dict[str, dict[str, float]]:
    """Per tensor both patches change: {"relative_gap": ‖Δ' − Δ‖_F / ‖Δ‖_F, "cosine": cos(Δ, Δ')}."""
    out = {}
    for key in sorted(set(delta) & set(reference)):
        a, b = dense(delta[key]).flatten(), dense(reference[key]).flatten()
        out[key] = {"relative_gap": float((b - a).norm() / a.norm().clamp_min(1e-12)),
                    "cosine": float(torch.nn.functional.cosine_similarity(a, b, dim=0))}
    return out


def ported_model(new_base: str | Path, deltas: Mapping[str, Delta], *, options: LoadOptions = CPU_FP32) -> torch.nn.Module:
    """θ' + Δ in memory: the new base (safetensors only, opened as `options` say) with every delta of the patch added
    (fits checked first). The sum is taken in float32 and rounded once to the weights' dtype."""
    check_fits(deltas, new_base)
    model = load_causal_lm(new_base, options)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, delta in deltas.items():
            if key not in params:
                raise PortError(f"{new_base}: tensor {key!r} is not a parameter of the loaded model")
            p = params[key]
            p.copy_((p.float() + dense(delta).to(p.device).view_as(p)).to(p.dtype))
    return model
