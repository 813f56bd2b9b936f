"""The DeepSpeed config a training run uses, built from plain arguments plus user overrides."""

from __future__ import annotations

import copy
from typing import Any


def deep_update(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, nested dicts merged key by key (neither input changed)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def build_deepspeed_config(
    *, micro_batch_size: int, lr: float, steps: int, warmup_steps: int, zero_stage: int,
    grad_clip: float, bf16: bool, offload_optimizer: bool, overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ZeRO config for AdamW with linear warmup and decay; `overrides` wins key by key."""
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, "torch_adam": not offload_optimizer}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_num_steps": warmup_steps,
                       "total_num_steps": max(steps, warmup_steps + 1), "warmup_type": "linear"},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_update(cfg, overrides or {})
