"""Training checkpoints in Ray Train storage: what a restarted worker group needs to continue a job exactly.

A checkpoint is one folder that every rank contributes to (Ray Train merges what the ranks report):
DeepSpeed's own files under tag `job<i>-step<n>` (weights, optimizer and scheduler state, one optimizer
shard per rank), `graftline_run.json` (rank 0: which job, after how many steps) and
`graftline_rank<r>.json` (each rank's loop state: its data pools' order and RNG, torch's RNG, the losses
and training seconds so far). Restoring all of it makes the resumed job's steps, samples and losses
continue as if nothing had happened. DeepSpeed writes its files with `torch.save`; they are read back
with `torch.load(weights_only=True)`, allowing only the few DeepSpeed classes they hold.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_STATE, RANK_STATE = "graftline_run.json", "graftline_rank{}.json"


@dataclass(frozen=True)
class Resume:
    """Where a restarted worker group picks up: job `job`, after `step` steps, from DeepSpeed tag `tag` in `folder`."""

    folder: Path
    job: int
    step: int
    tag: str
    restarts: int  # how often this job had resumed before
    rank_state: dict[str, Any]  # this rank's loop state (see `save`)

    @classmethod
    def read(cls, folder: Path, rank: int) -> Resume:
        run = json.loads((folder / RUN_STATE).read_text())
        state = json.loads((folder / RANK_STATE.format(rank)).read_text())
        return cls(folder, run["job"], run["step"], run["tag"], run["restarts"], state)


def save(engine, *, rank: int, job: int, step: int, restarts: int, adapter: bool, state: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Every rank: save the engine and this rank's loop `state` to a local folder and report it to Ray Train (a barrier)."""
    import ray.train
    import torch.distributed as dist

    with tempfile.TemporaryDirectory(prefix="graftline-ckpt-") as tmp:
        tag = f"job{job}-step{step}"
        engine.save_checkpoint(tmp, tag=tag, exclude_frozen_parameters=adapter)  # an adapter's frozen base comes from its model
        (Path(tmp) / RANK_STATE.format(rank)).write_text(json.dumps(state))
        if rank == 0:
            (Path(tmp) / RUN_STATE).write_text(json.dumps({"job": job, "step": step, "tag": tag, "restarts": restarts}))
        dist.barrier()
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def load(engine, resume: Resume, *, adapter: bool) -> None:
    """Load the engine's weights, optimizer and scheduler state from `resume`'s checkpoint, reading no pickle."""
    _weights_only_loads(engine)
    loaded, _ = engine.load_checkpoint(str(resume.folder), tag=resume.tag, load_module_strict=not adapter)
    if loaded is None:  # DeepSpeed only warns when it finds no checkpoint
        raise RuntimeError(f"{resume.folder}: no DeepSpeed checkpoint {resume.tag!r} to resume from")


def _weights_only_loads(engine) -> None:
    """Make the engine read checkpoints with `torch.load(weights_only=True)`; DeepSpeed's own engine unpickles."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]  # what ZeRO-2/3 optimizer states hold besides tensors

    def weights_only(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = weights_only


def rng_state() -> dict[str, Any]:
    """torch's RNG state (and CUDA's, on a GPU), as JSON."""
    import torch

    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
