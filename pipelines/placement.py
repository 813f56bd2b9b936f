"""Where a stage's model work runs: device, dtype and the Ray resources of its tasks, decided once from the spec."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipelines.spec import JobSpec


@dataclass(frozen=True)
class Placement:
    """A model task's device (`cpu` | `cuda`), its weights' dtype, and what its Ray task asks for."""

    device: str
    dtype: str
    num_gpus: float
    threads: int

    def ray_options(self) -> dict[str, Any]:
        return {"num_cpus": 1, "num_gpus": self.num_gpus}

    def place(self, model):
        """`model` moved to this placement's device and dtype (in place for an nn.Module; returned for chaining)."""
        import torch

        torch.set_num_threads(self.threads)
        return model.to(device=self.device, dtype=getattr(torch, self.dtype))


def placement(spec: JobSpec) -> Placement:
    """`train.accelerator: cuda`: one GPU per model task, in bfloat16; else the CPU in float32, one thread per task
    (Ray runs as many tasks as there are cores)."""
    if spec.train.accelerator == "cuda":
        return Placement("cuda", "bfloat16", 1.0, spec.train.cpus_per_worker)
    return Placement("cpu", "float32", 0.0, 1)
