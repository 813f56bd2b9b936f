"""Calibration statistics for calibration-aware compression: how strongly each input channel of each
linear layer is driven on real data.

`input_scales` runs a model over a few batches of the skill's data and returns, per linear weight,
s_j = sqrt(E[x_j²]) over every real (unpadded) token: the diagonal of the input second moment. A SkillPack compressed
against these scales (`graft.skillpack.pack_skill(..., input_scales=...)`) keeps the directions of a
delta that change the layer's output on such inputs (activation-aware SVD), rather than the largest
ones in weight space.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from graft.data import collated_batches, encode_examples

EPS_RELATIVE = 1e-4  # channels never driven still get a small scale, so the SVD stays well defined


@torch.no_grad()
def input_scales(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """{weight key: (in_features,) scale} for the `nn.Linear` modules named by `keys` (e.g. 'model.layers.0.mlp.up_proj.weight')."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    current: dict[str, torch.Tensor] = {}

    def hook(key: str):
        def record(module, args, output) -> None:
            x = args[0].detach().float()
            mask = current.get("mask")
            x = x[mask.bool()] if mask is not None and mask.shape == x.shape[:-1] else x.reshape(-1, x.shape[-1])
            sums[key] = sums.get(key, 0) + x.pow(2).sum(0)
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
            current["mask"] = batch.get("attention_mask")
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for key, total in sums.items():
        rms = (total / counts[key]).sqrt()
        out[key] = rms.clamp_min(float(rms.max()) * EPS_RELATIVE).contiguous()
    return out


def input_scales_on(model: torch.nn.Module, tokenizer, rows: list[dict[str, str]], keys: Iterable[str], max_length: int = 64,
                    batch_size: int = 32) -> dict[str, torch.Tensor]:
    """`input_scales` of `model` on prompt/answer `rows` (e.g. a skill's training examples)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return input_scales(model, collated_batches(encode_examples(tokenizer, rows, max_length), pad, batch_size), keys)
