"""Calibration statistics for calibration-aware compression: what each linear layer's inputs look like
on real data.

`input_moments` runs a model over a few batches of a skill's data and returns, per linear weight, the
second moment of its inputs H = E[x xᵀ] over every real (unpadded) token. SkillPacks use it three ways
(`graft.skillpack.pack_skill(..., calibration=...)`): GPTQ rounds the factors so the *output* error on
such inputs is small, U is refit to the rounded V under it, and an activation-weighted SVD takes the
input scale s_j = sqrt(H_jj) (`rms_scales`). Layers fed the same tensor (q/k/v, gate/up) share one
matrix; each costs in_features² floats (a Llama-3-8B layer: about 1 GB, all 32 layers: about 33 GB,
hence `LayerMoments`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch

EPS_RELATIVE = 1e-4  # channels never driven still get a small scale, so the SVD stays well defined


@torch.no_grad()
def input_moments(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """{weight key: (in_features, in_features) E[x xᵀ]} for the `nn.Linear` modules named by `keys`.

    Keys name weights, e.g. 'model.layers.0.mlp.up_proj.weight'; keys of other module types are left out.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}  # key -> the key whose module reads the very same input tensor
    handles = []
    current: dict = {}

    def hook(key: str):
        def record(module, args, output) -> None:
            inp, parent = args[0], key.rsplit(".", 2)[0]
            if current.get("parent") != parent:  # siblings (q/k/v, gate/up) run back to back under one parent
                current.update(parent=parent, seen=[])
            first = next((k for t, k in current["seen"] if t is inp), None)
            if first is not None:
                alias[key] = first
                return
            current["seen"].append((inp, key))
            x = inp.detach().float()
            mask = current.get("mask")
            x = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            if key in sums:  # one fp32 matmul over all of the batch's tokens, on the activations' device, in place
                sums[key].addmm_(x.T, x)
            else:
                sums[key] = x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]
        return record

    for key in keys:
        module = modules.get(key.removesuffix(".weight"))
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(hook(key)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            current.update(mask=batch.get("attention_mask"), parent=None)
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {key: (total / counts[key]).contiguous() for key, total in sums.items()}
    out.update({key: out[first] for key, first in alias.items() if first in out})
    return out


def rms_scales(moment: torch.Tensor) -> torch.Tensor:
    """s_j = sqrt(E[x_j²]) from a second-moment matrix, floored at EPS_RELATIVE of the largest."""
    rms = torch.diagonal(moment).clamp_min(0).sqrt()
    return rms.clamp_min(float(rms.max()) * EPS_RELATIVE).contiguous()


def layer_of(key: str) -> str:
    """The block a linear weight belongs to: 'model.layers.3' for 'model.layers.3.mlp.up_proj.weight'."""
    return key.rsplit(".", 3)[0]


class LayerMoments(Mapping[str, torch.Tensor]):
    """`input_moments` of `keys`, computed one layer at a time when first asked for: one pass over
    `batches` per layer, and only the current layer's matrices in memory. Asking for a key of another
    layer drops the current ones, so ask in layer order (`sorted(keys)` is); `passes` counts the passes."""

    def __init__(self, model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], keys: Iterable[str]) -> None:
        linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        self.model, self.batches = model, list(batches)
        self._order = [k for k in keys if k.removesuffix(".weight") in linear]
        self._known = set(self._order)
        self._held: dict[str, torch.Tensor] = {}
        self.passes = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._known:
            raise KeyError(key)
        if key not in self._held:
            layer = layer_of(key)
            self._held = {}
            self._held = input_moments(self.model, self.batches, [k for k in self._order if layer_of(k) == layer])
            self.passes += 1
        return self._held[key]

    def __contains__(self, key: object) -> bool:
        return key in self._known

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)
