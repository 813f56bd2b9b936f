"""Calibration statistics for calibration-aware compression: what each linear layer's inputs look like
on real data.

`input_moments` runs a model over a few batches of a skill's data and returns, per linear weight, the
second moment of its inputs H = E[x xᵀ] over every real (unpadded) token. SkillPacks use it three ways
(`graft.skillpack.pack_skill(..., calibration=...)`): GPTQ rounds the factors so the *output* error on
such inputs is small, U is refit to the rounded V under it, and an activation-weighted SVD takes the
input scale s_j = sqrt(H_jj) (`rms_scales`). Layers fed the same tensor (q/k/v, gate/up) share one
matrix; each costs in_features² floats.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from graft.data import collated_batches, encode_examples

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
            sums[key] = sums.get(key, 0) + x.T @ x
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


def input_moments_on(model: torch.nn.Module, tokenizer, rows: list[dict[str, str]], keys: Iterable[str], max_length: int = 64,
                     batch_size: int = 32) -> dict[str, torch.Tensor]:
    """`input_moments` of `model` on prompt/answer `rows` (e.g. the data a skill's expert was trained on)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return input_moments(model, collated_batches(encode_examples(tokenizer, rows, max_length), pad, batch_size), keys)
