"""From an expert on disk to a SkillPack: calibration, packing and grid tuning, in that order.

The pack stage, `graft pack` and the benchmarks all pack an expert (`graft.experts.Expert`: a LoRA
adapter on the base, or a fully fine-tuned checkpoint of it) the same way: when the settings ask for
calibration, the expert runs on the calibration batches and each layer's input moments are taken one
layer at a time (`graft.calibration.LayerMoments`); the deltas are packed (`graft.skillpack.pack_skill`);
with `tune_steps` the pack's grids are then fitted to the expert's answers on the same batches
(`graft.grid_tuning.tune_grids`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from graft.calibration import LayerMoments
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.grid_tuning import DEFAULT_LR, tune_grids
from graft.experts import Expert
from graft.loading import CPU_FP32, LoadOptions
from graft.lora import load_with_adapter
from graft.skillpack import Delta, PackSettings, SkillPack, SkillPackError, pack_skill


def pack_expert(skill: str, base: str | Path, expert: Expert, deltas: dict[str, Delta], settings: PackSettings, *,
                calibration_batches: list[dict[str, torch.Tensor]] | None = None, importance: dict[str, torch.Tensor] | None = None,
                source: dict | None = None, tune_steps: int = 0, tune_lr: float = DEFAULT_LR,
                load: LoadOptions = CPU_FP32) -> SkillPack:
    """Pack `deltas` (the expert's, or a subset) of `expert` into a SkillPack for `base`.

    `calibration_batches` (collated rows with answer labels, `graft.data.labelled_batches`) are needed
    when `settings.needs_calibration` or `tune_steps` > 0; the expert is loaded only then, as `load` says.
    """
    if (settings.needs_calibration or tune_steps) and not calibration_batches:
        raise SkillPackError(f"packing {skill!r} with these settings needs calibration batches (the expert's training rows)")
    model = expert.load(base, options=load) if calibration_batches else None
    moments = LayerMoments(model, calibration_batches, list(deltas)) if model is not None else None
    pack = pack_skill(skill, deltas, base_fingerprint(CheckpointReader(base), list(deltas)), settings, source,
                      calibration=moments, importance=importance)
    if tune_steps:
        pack = tune_grids(pack, load_with_adapter(base, None, options=load), model, calibration_batches, tune_steps, tune_lr)
    return pack
