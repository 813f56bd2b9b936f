"""How graftline opens a causal LM: safetensors only, in the dtype and on the device the caller chose.

Every loader in graft/ goes through `load_causal_lm`, so no loader hard-codes float32 or the CPU: the
pipeline decides both once from the job (`pipelines.placement`) and passes them down. On a device other
than the CPU the weights are read straight onto it (`device_map`), never first materialised on the host
in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from graft.checkpoint import weight_files

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LoadOptions:
    """Where and in what precision a model is opened (plain values, so a Ray task can carry them)."""

    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


CPU_FP32 = LoadOptions()


def load_causal_lm(folder: str | Path, options: LoadOptions = CPU_FP32) -> torch.nn.Module:
    """The HF causal LM in `folder`, from safetensors only (a folder of pickles is refused by name)."""
    from transformers import AutoModelForCausalLM

    if Path(folder).is_dir():
        weight_files(folder)
    kwargs = {} if options.device == "cpu" else {"device_map": options.device}
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=options.torch_dtype, use_safetensors=True,
                                                trust_remote_code=options.trust_remote_code, **kwargs)
