"""PEFT LoRA adapter folders as per-module low-rank deltas, kept factored.

A LoRA adapter changes weight `W` of module `m` by `ΔW = s · B A` (s = alpha/r, or alpha/√r with
rsLoRA). `read_lora_deltas` maps each adapted module to the base checkpoint's tensor name and keeps
`A` and `B` apart: a delta is densified only where a method needs the full matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.artifacts import ArtifactError, parse_json
from graft.checkpoint import CheckpointError, CheckpointReader, weight_files
from graft.loading import CPU_FP32, LoadOptions, load_causal_lm
from graft.manifests import AdapterConfig

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LowRankDelta:
    """ΔW = scale · B @ A for the base tensor `key` (transposed when the layer stores W as in×out)."""

    key: str
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scale: float
    fan_in_fan_out: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        out, inn = self.B.shape[0], self.A.shape[1]
        return (inn, out) if self.fan_in_fan_out else (out, inn)

    def dense(self) -> torch.Tensor:
        d = self.scale * (self.B.float() @ self.A.float())
        return d.T if self.fan_in_fan_out else d


def _base_key(adapter_key: str) -> tuple[str, str]:
    """('model.layers.0.self_attn.q_proj.weight', 'A') from a PEFT adapter tensor name."""
    key = adapter_key.removeprefix("base_model.model.")
    for part in ("A", "B"):
        for marker in (f".lora_{part}.weight", f".lora_{part}.default.weight"):
            if key.endswith(marker):
                return key[: -len(marker)] + ".weight", part
    raise CheckpointError(f"adapter tensor {adapter_key!r} is not a LoRA A/B matrix (only plain LoRA is supported)")


def adapter_config(folder: str | Path) -> AdapterConfig:
    """A PEFT LoRA adapter folder's config, checked by schema (CheckpointError naming the file and field)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not an adapter folder")
    try:
        return parse_json(folder / ADAPTER_CONFIG, AdapterConfig, "PEFT LoRA adapter")
    except ArtifactError as e:
        raise CheckpointError(str(e)) from None


def read_lora_deltas(folder: str | Path) -> dict[str, LowRankDelta]:
    """Low-rank deltas of a PEFT LoRA adapter folder, keyed by the base model's tensor names."""
    folder = Path(folder)
    cfg = adapter_config(folder).model_dump()
    reader = CheckpointReader(folder)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in reader.items():
        key, part = _base_key(name)
        parts.setdefault(key, {})[part] = t
    deltas = {}
    for key, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{folder}: tensor {key!r} has lora_{'A' if 'A' not in ab else 'B'} missing")
        module = key.removesuffix(".weight")
        r = ab["A"].shape[0]
        alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", r))
        r_cfg = _pattern(cfg.get("rank_pattern") or {}, module, cfg.get("r", r))
        if r_cfg != r:
            raise CheckpointError(f"{folder}: tensor {key!r} has rank {r}, adapter_config.json says {r_cfg}")
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        deltas[key] = LowRankDelta(key, ab["A"], ab["B"], scale, bool(cfg.get("fan_in_fan_out", False)))
    return deltas


def _pattern(patterns: dict, module: str, default):
    for pat, value in patterns.items():
        if module.endswith(pat):
            return value
    return default


def check_adapter_folder(adapter: str | Path) -> Path:
    """The folder, if it holds a LoRA config and `adapter_model.safetensors`; else CheckpointError naming it.

    PEFT falls back to a pickled `adapter_model.bin` when no safetensors file is there; such a folder
    is refused here, before PEFT looks.
    """
    folder = Path(adapter)
    adapter_config(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        weight_files(folder)  # names a pickle it refuses, if that is what the folder holds
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS}")
    return folder


def load_adapter(model, adapter: str | Path, *, trainable: bool = False):
    """`model` wrapped with the PEFT adapter in folder `adapter`, read from safetensors only (`check_adapter_folder`);
    with `trainable`, its weights train on (e.g. DPO after the SFT that made it)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(check_adapter_folder(adapter)), is_trainable=trainable)


def load_with_adapter(base: str | Path, adapter: str | Path | None, *, options: LoadOptions = CPU_FP32):
    """The base causal LM (safetensors only, in `options`' dtype and device), with a LoRA adapter merged into its
    weights when one is given."""
    if adapter is not None:
        check_adapter_folder(adapter)  # before the base is loaded, not after
    model = load_causal_lm(base, options)
    if adapter is None:
        return model
    return load_adapter(model, adapter).merge_and_unload()
