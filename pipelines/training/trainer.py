"""Run one training job as a Ray Train `TorchTrainer` whose loop drives DeepSpeed ZeRO."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipelines.training.loop import train_loop


@dataclass(frozen=True)
class TrainRequest:
    """Everything one training run needs, as plain values (paths absolute)."""

    model_path: str
    tokenizer_path: str
    data_path: str
    mode: str  # "lora" or "full"
    steps: int
    batch_size: int
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
    lora: dict[str, Any] = field(default_factory=dict)
    deepspeed: dict[str, Any] = field(default_factory=dict)
    threads_per_worker: int = 1
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    log_every: int = 20


def run_training(req: TrainRequest, storage_path: str | Path, out_dir: str | Path, name: str) -> Path:
    """Train on a Ray Train worker group and copy the reported checkpoint folder to `out_dir`.

    Each call gets a fresh Ray Train run name: reusing a (storage_path, name) pair would make Ray
    Train V2 silently resume that earlier run.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = req.accelerator == "cuda"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(req),
        scaling_config=ScalingConfig(num_workers=req.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": req.threads_per_worker}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(Path(storage_path).resolve()), name=f"{name}-{uuid.uuid4().hex[:8]}",
                             failure_config=FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {name} reported no checkpoint")
    out_dir = Path(out_dir)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, out_dir, dirs_exist_ok=True)
    return out_dir
