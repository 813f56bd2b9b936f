"""Run trainings as one Ray Train `TorchTrainer` whose loop drives DeepSpeed ZeRO.

A `TrainRequest` says what one training makes, completely: its inputs as `Ref`s (hashed by their
content keys), every setting, the effective DeepSpeed config (resolved once, on the driver) and the
loop version. Its content key is therefore the key of the output it makes. A `TrainJob` adds where
the output goes and where its loss is logged, which do not change what is trained.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.atomic import scratch_dir
from pipelines.cache import KEYED_IF_SET, Ref, content_key
from pipelines.training.deepspeed_config import zero_stage_of
from pipelines.training.loop import LOOP_VERSION, train_loop
from pipelines.training.modes import MODES
from pipelines.training.objectives import OBJECTIVES
from pipelines.training.progress import ProgressPrinter



@dataclass(frozen=True)
class TrainRequest:
    """What one training makes, completely; `key()` is the content key of its output."""

    model: Ref  # the checkpoint training starts from
    tokenizer: Ref
    data: Ref  # prompt/answer JSONL
    mode: str  # "full" (a whole checkpoint), or an adapter on `model`: "lora", "sparse"
    steps: int
    batch_size: int  # per worker
    seed: int
    deepspeed: dict[str, Any]  # the effective DeepSpeed config (deepspeed_config.build_deepspeed_config)
    num_workers: int = 2
    accelerator: str = "cpu"
    threads_per_worker: int = 1
    loss_on: str = "answer"
    max_length: int = 64
    replay: Ref | None = None  # JSONL replayed in every batch, `replay_fraction` of it
    replay_fraction: float = 0.0
    adapter: dict[str, Any] | None = None  # the adapter mode's settings (lora: rank, alpha, dropout, target_modules; sparse: ...)
    trust_remote_code: bool = False
    loop_version: int = LOOP_VERSION
    # an `objectives.OBJECTIVES` name: "sft" (next-token loss on prompt/answer rows) or "dpo" (preference pairs)
    objective: str = field(default="sft", metadata=KEYED_IF_SET)
    objective_settings: dict[str, Any] | None = field(default=None, metadata=KEYED_IF_SET)  # dpo: {"beta": ...}

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"training mode must be one of {tuple(MODES)}, got {self.mode!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"training objective must be one of {tuple(OBJECTIVES)}, got {self.objective!r}")
        objective = OBJECTIVES[self.objective]
        missing = [k for k in objective.settings if k not in (self.objective_settings or {})]
        if missing:
            raise ValueError(f"objective {self.objective!r} needs objective_settings {missing}")
        if self.replay is not None and not objective.takes_replay:
            raise ValueError(f"objective {self.objective!r} takes no replay data")
        if MODES[self.mode].adapter != (self.adapter is not None):
            raise ValueError(f"mode {self.mode!r}: an adapter training needs `adapter` settings, and only an adapter training takes them")
        zero_stage_of(self.deepspeed)

    @property
    def zero_stage(self) -> int:
        """The ZeRO stage this training runs: the effective config's, whatever field set it."""
        return zero_stage_of(self.deepspeed)

    def key(self) -> str:
        return content_key(self)


@dataclass(frozen=True)
class TrainJob:
    """One training as the worker group runs it: the request, the folder it writes, the MLflow run it logs to."""

    request: TrainRequest
    out_dir: str  # absolute; on storage every node sees
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log_every: int = 20
    system_metrics_every_s: float = 0.0  # rank 0's node sampled into the run this often; 0: not at all


def run_training(jobs: Sequence[TrainJob], storage_path: str | Path, name: str, *, checkpoint_every: int, max_failures: int,
                 log: Callable[[str], None] | None = None, names: Mapping[str, str] | None = None) -> None:
    """Train every job, in order, on one Ray Train worker group; each writes its `out_dir`.

    Every `checkpoint_every` steps the group reports a checkpoint to Ray Train storage under
    `storage_path`; a failed worker group is restarted from the last one up to `max_failures` times.
    Each call gets a fresh Ray Train run name (reusing a (storage_path, name) pair would make Ray Train V2
    silently resume that earlier run) in a scratch folder of its own (`graft.atomic.scratch_dir`),
    removed when the call ends, or by the next training under `storage_path` if this process is killed:
    nothing else can resume from it. With `log`, the run's progress is printed through it as it trains, each job
    by its `out_dir`'s entry in `names` (`pipelines.training.progress`): rank 0 writes where it is into that scratch folder.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not jobs:
        return
    shape = {(j.request.num_workers, j.request.accelerator, j.request.threads_per_worker) for j in jobs}
    if len(shape) != 1:
        raise ValueError("trainings run together must share num_workers, accelerator and threads_per_worker")
    first = jobs[0].request
    use_gpu = first.accelerator == "cuda"
    with scratch_dir(Path(storage_path).resolve(), name) as storage:
        run_name = f"{name}-{uuid.uuid4().hex[:8]}"
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"jobs": list(jobs), "accelerator": first.accelerator, "threads_per_worker": first.threads_per_worker,
                               "checkpoint_every": checkpoint_every, "progress": str(storage) if log else None},
            scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=use_gpu,
                                         resources_per_worker={"CPU": first.threads_per_worker}),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(storage_path=str(storage), name=run_name, failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)),
        )
        labels = [(names or {}).get(j.out_dir, Path(j.out_dir).name) for j in jobs]
        with ProgressPrinter(storage, labels, first.num_workers, log) if log else contextlib.nullcontext():
            trainer.fit()
    for j in jobs:
        if not (Path(j.out_dir) / "train_info.json").is_file():
            raise RuntimeError(f"training into {j.out_dir} finished without writing its outputs")
