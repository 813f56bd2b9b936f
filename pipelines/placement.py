"""Where a stage's model work runs: device, dtype, threads and the Ray resources of its tasks, decided once from the spec.

Every stage that opens a model outside training (score, pack, evaluate, distill, concepts, transplant, port
evaluation, the merge study) takes its `Placement` from `placement(spec)` and nothing else: a task calls
`enter()` first, opens models with `load_options(...)`, moves its batches with `batch(...)`, and is submitted
with `ray_options()`. Training places its own workers (`compute.accelerator` too; one GPU per worker).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graft.loading import DTYPES, LoadOptions
from pipelines.spec import JobSpec


@dataclass(frozen=True)
class Placement:
    """A model task's device (`cpu` | `cuda`), its weights' dtype (a `graft.loading.DTYPES` name), its CPU threads,
    and the GPU share its Ray task asks for."""

    device: str
    dtype: str
    num_gpus: float
    threads: int

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    def ray_options(self) -> dict[str, Any]:
        """What the task's `ray.remote(...)` asks for."""
        return {"num_cpus": self.threads, "num_gpus": self.num_gpus}

    def load_options(self, trust_remote_code: bool) -> LoadOptions:
        """How a task opens its models (`graft.loading`)."""
        return LoadOptions(self.dtype, self.device, trust_remote_code)

    def enter(self) -> None:
        """Set up the task's process: its CPU threads (Ray runs as many one-thread CPU tasks as there are cores)."""
        import torch

        torch.set_num_threads(self.threads)

    def batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """A collated batch with its tensors on this placement's device."""
        import torch

        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def place(self, model):
        """`model` moved to this placement's device and dtype (in place for an nn.Module; returned for chaining)."""
        self.enter()
        return model.to(device=self.device, dtype=DTYPES[self.dtype])


def placement(spec: JobSpec) -> Placement:
    """`compute.accelerator: cuda`: bfloat16 on `compute.gpus_per_task` of a GPU; else the CPU in float32. Either way
    with `compute.cpus_per_task` threads."""
    c = spec.compute
    if c.accelerator == "cuda":
        return Placement("cuda", "bfloat16", c.gpus_per_task, c.cpus_per_task)
    return Placement("cpu", "float32", 0.0, c.cpus_per_task)
