"""Run trainings as one Ray Train `TorchTrainer` whose loop drives DeepSpeed ZeRO."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.training.loop import train_loop


@dataclass(frozen=True)
class TrainRequest:
    """Everything one training needs, as plain values (paths absolute)."""

    model_path: str
    tokenizer_path: str
    data_path: str
    out_dir: str
    mode: str  # "lora" or "full"
    steps: int
    batch_size: int  # per worker
    lr: float
    seed: int
    zero_stage: int = 2
    num_workers: int = 2
    accelerator: str = "cpu"
    warmup_steps: int = 10
    grad_clip: float = 1.0
    bf16: bool = False
    offload_optimizer: bool = False
    loss_on: str = "answer"
    max_length: int = 64
    replay_path: str | None = None
    replay_fraction: float = 0.0
    lora: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    threads_per_worker: int = 1
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log_every: int = 20


def run_training(reqs: Sequence[TrainRequest], storage_path: str | Path, name: str) -> None:
    """Train every request, in order, on one Ray Train worker group; each writes its `out_dir`.

    Each call gets a fresh Ray Train run name: reusing a (storage_path, name) pair would make Ray
    Train V2 silently resume that earlier run.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not reqs:
        return
    shape = {(r.num_workers, r.accelerator, r.threads_per_worker) for r in reqs}
    if len(shape) != 1:
        raise ValueError("trainings run together must share num_workers, accelerator and threads_per_worker")
    first = reqs[0]
    use_gpu = first.accelerator == "cuda"
    run_name = f"{name}-{uuid.uuid4().hex[:8]}"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"jobs": [asdict(r) for r in reqs], "accelerator": first.accelerator,
                           "threads_per_worker": first.threads_per_worker},
        scaling_config=ScalingConfig(num_workers=first.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": first.threads_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=run_name,
                             failure_config=FailureConfig(max_failures=0)),
    )
    trainer.fit()
    shutil.rmtree(Path(storage_path) / run_name, ignore_errors=True)
    for r in reqs:
        if not (Path(r.out_dir) / "train_info.json").is_file():
            raise RuntimeError(f"training into {r.out_dir} finished without writing its outputs")
