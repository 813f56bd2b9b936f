"""The DeepSpeed config a training run uses, built from plain arguments plus user overrides.

The driver builds the effective config once (`build_deepspeed_config`) and sends it in the training
request; every decision that depends on it (gather before save, what train_info.json and MLflow
record) reads the stage from that config (`zero_stage_of`), never from the field the user set, so an
override that changes the stage cannot go unnoticed.
"""

from __future__ import annotations

import copy
from typing import Any

# What graftline sets from `train.batch_size` and the loop's one optimizer step per batch; an override of
# these would make the loop's step count and sampling disagree with what DeepSpeed does.
RESERVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
GRAD_CLIP = 1.0  # the gradient-norm clip graftline's trainings use (an override may change it)


def deep_update(base: dict, override: dict) -> dict:
    """`base` with `override` merged in, nested dicts merged key by key (neither input changed)."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def override_problem(overrides: dict[str, Any]) -> str | None:
    """Why a `train.deepspeed` mapping cannot be merged, or None: a reserved key, or a stage that is not 0-3."""
    for key in RESERVED_KEYS:
        if key in overrides:
            return f"{key}: set by train.batch_size (one optimizer step per batch); remove it from the DeepSpeed overrides"
    zero = overrides.get("zero_optimization", {})
    if not isinstance(zero, dict):
        return "zero_optimization: expected a mapping"
    if "stage" in zero and (isinstance(zero["stage"], bool) or zero["stage"] not in (0, 1, 2, 3)):
        return f"zero_optimization.stage: expected 0, 1, 2 or 3, got {zero['stage']!r}"
    return None


def zero_stage_of(cfg: dict[str, Any]) -> int:
    """The ZeRO stage an effective DeepSpeed config runs (0, DeepSpeed's default, when it names none)."""
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    return int(stage)


def build_deepspeed_config(
    *, micro_batch_size: int, lr: float, steps: int, warmup_steps: int, zero_stage: int,
    grad_clip: float, bf16: bool, offload_optimizer: bool, overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ZeRO config for AdamW with linear warmup and decay; `overrides` wins key by key."""
    problem = override_problem(overrides or {})
    if problem:
        raise ValueError(f"DeepSpeed overrides: {problem}")
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
