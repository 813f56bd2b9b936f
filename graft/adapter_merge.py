"""Merge several LoRA adapters into ONE LoRA adapter, without touching the base model.

Each adapter's per-module delta ΔW_i = s_i·B_i A_i is combined by a merge method from `graft.merge`
(linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune: the same parameters and
semantics as merging whole models, with the deltas as task vectors against a zero base), then
re-factorized by truncated SVD to the chosen rank and written as a PEFT adapter folder that
`PeftModel.from_pretrained` loads. Users keep one small adapter instead of a merged full model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from graft.atomic import atomic_dir
from graft.lora import LowRankDelta, adapter_config, read_lora_deltas
from graft.merge.base import MERGE_METHODS, MISSING, BasePolicy, Scope, TensorTask, spec_of


def _params(method: str, n: int, weights: Sequence[float], density: float | Sequence[float],
            shared: dict[str, Any]) -> tuple[dict, list[dict]]:
    spec = spec_of(method)
    densities = list(density) if isinstance(density, Sequence) else [density] * n
    if len(densities) != n:
        raise ValueError(f"{n} inputs but {len(densities)} densities")
    per_input = {"weight": list(weights), "density": densities}
    glob, each = {}, [{} for _ in range(n)]
    for p in spec.params:
        if p.scope == Scope.SHARED:
            value = shared.get(p.name, p.default)
            if value is MISSING:
                raise ValueError(f"merge method {method!r} needs parameter {p.name!r}")
            glob[p.name] = p.validate(value)
        else:
            for i in range(n):
                value = per_input[p.name][i] if p.name in per_input else p.default
                if value is MISSING:
                    raise ValueError(f"merge method {method!r} needs per-adapter parameter {p.name!r}")
                each[i][p.name] = p.validate(value)
    unknown = set(shared) - {p.name for p in spec.params}
    if unknown:
        raise ValueError(f"merge method {method!r} has no parameter {sorted(unknown)[0]!r}")
    return glob, each


def refactorize(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A the best rank-`rank` approximation of `delta` (scale 1)."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).contiguous(), (u[:, :rank] * root).contiguous()


def merge_deltas(deltas: Sequence[dict[str, torch.Tensor | LowRankDelta]], method: str = "ties",
                 weights: Sequence[float] | None = None, density: float | Sequence[float] = 1.0, seed: int = 0,
                 sources: Sequence[str] | None = None, **shared: Any) -> dict[str, torch.Tensor]:
    """Merge per-tensor task vectors (dense or low-rank) with a task-arithmetic `method`; dense merged deltas.

    The same TIES/DARE/... functions as `graft merge`, with a zero base, so `deltas` are the task vectors.
    A tensor missing from one input counts as a zero delta there. `density` is one value or one per input;
    `sources` name the inputs in errors.
    """
    sources = list(sources) if sources is not None else [f"input {i}" for i in range(len(deltas))]
    weights = list(weights) if weights is not None else [1.0] * len(deltas)
    glob, each = _params(method, len(deltas), weights, density, shared)
    fn = MERGE_METHODS.get(method)
    out: dict[str, torch.Tensor] = {}
    for key in sorted(set().union(*deltas)):
        shape = tuple(next(d[key].shape for d in deltas if key in d))
        for source, d in zip(sources, deltas):
            if key in d and tuple(d[key].shape) != shape:
                raise ValueError(f"{source}: tensor {key!r} has shape {tuple(d[key].shape)}, others {shape}")
        dense = [_dense(d[key]) if key in d else torch.zeros(shape) for d in deltas]
        base = None if spec_of(method).base is BasePolicy.IGNORED else torch.zeros(shape)
        merged = fn(TensorTask(key, dense, base, dict(glob), [dict(p) for p in each], seed))
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging tensor {key!r} produced NaN or Inf")
        out[key] = merged
    return out


def _dense(delta: torch.Tensor | LowRankDelta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, LowRankDelta) else delta.float().clone()


def merge_adapters(adapters: Sequence[str | Path], out: str | Path, method: str = "ties",
                   weights: Sequence[float] | None = None, density: float = 1.0, rank: int | None = None,
                   seed: int = 0, overwrite: bool = False, **shared: Any) -> dict:
    """Merge LoRA `adapters` with `method` into one PEFT LoRA adapter of `rank` at `out` (atomic; never over an input)."""
    if len(adapters) < 2:
        raise ValueError("merging needs at least two adapters")
    if spec_of(method).base is not BasePolicy.REQUIRED and method != "linear":
        raise ValueError(f"merge method {method!r} does not combine task vectors; use linear or a task-arithmetic method")
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise ValueError(f"{len(adapters)} adapters but {len(weights)} weights")
    deltas: list[dict[str, LowRankDelta]] = [read_lora_deltas(a) for a in adapters]
    for folder, d in zip(adapters, deltas):
        if any(x.fan_in_fan_out for x in d.values()):
            raise ValueError(f"{folder}: fan_in_fan_out adapters (Conv1D layers) are not supported for adapter merging")
    rank = rank or max(x.A.shape[0] for d in deltas for x in d.values())
    tensors: dict[str, torch.Tensor] = {}
    merged = merge_deltas(deltas, method, weights, density, seed, sources=[str(a) for a in adapters], **shared)
    for key, delta in merged.items():
        a, b = refactorize(delta, min(rank, *delta.shape))
        module = key.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    keys = list(merged)
    config = adapter_config(adapters[0]).model_dump(mode="json")
    config.update({"r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                   "target_modules": sorted({k.removesuffix(".weight").rsplit(".", 1)[-1] for k in keys})})
    with atomic_dir(out, overwrite=overwrite, inputs=adapters, kind="adapter") as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
        (tmp / "graft_adapter_merge.json").write_text(json.dumps(
            {"adapters": [str(a) for a in adapters], "method": method, "weights": weights, "density": density,
             "rank": rank, "seed": seed, "parameters": shared}, indent=1))
    return {"out": str(out), "rank": rank, "tensors": len(keys)}
