"""Experts: a base model plus what training a skill changed, as a LoRA adapter or as a whole fine-tuned checkpoint.

A SkillPack is the compressed delta of an expert (methods.md §1.2: θ_after − θ_before). Two kinds of
expert make that delta, each one unit registered by name in `EXPERT_KINDS`:
- `lora`: a PEFT adapter folder; its delta is low rank and stays factored (`graft.lora`);
- `full`: a fine-tuned checkpoint of the base's architecture (GraftLLM's full SFT); its delta is dense,
  taken tensor by tensor against the base, and only tensors that changed are kept;
- `sparse`: a PEFT SHiRA adapter folder (`graft.sparse`); its delta is sparse and stays so (`SparseDelta`).
Each kind knows how to load the expert as a model (scoring, calibration, evaluation) and how to read
its deltas, keyed by the base's tensor names.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.checkpoint import CheckpointError, CheckpointReader, weight_files
from graft.loading import CPU_FP32, LoadOptions, load_causal_lm
from graft.lora import LowRankDelta, load_adapter, load_with_adapter, read_lora_deltas
from graft.registry import Registry
from graft.sparse import SparseDelta, load_sparse, read_sparse_deltas

Delta = torch.Tensor | LowRankDelta | SparseDelta


@dataclass(frozen=True)
class ExpertKind:
    """How one kind of expert is loaded as a model and read as deltas."""

    load: Callable[[str | Path, str | Path, LoadOptions], torch.nn.Module]  # (base, expert folder, how to open) -> model
    deltas: Callable[[str | Path, str | Path], dict[str, Delta]]  # (base, expert folder) -> {base tensor: delta}
    # the expert as evaluation tools take it (an adapter kept unmerged, as PEFT runs it); by default as `load` makes it
    open: Callable[[str | Path, str | Path, LoadOptions], torch.nn.Module] | None = None
    # the base tensors the delta changes, without holding the deltas; by default the keys of `deltas`
    touches: Callable[[str | Path, str | Path], list[str]] | None = None


EXPERT_KINDS: Registry[ExpertKind] = Registry("expert kind")  # type: ignore[type-var]


@dataclass(frozen=True)
class Expert:
    """One skill's expert on disk: its folder and its kind (an `EXPERT_KINDS` name)."""

    folder: Path
    kind: str = "lora"

    def __post_init__(self) -> None:
        EXPERT_KINDS.check(self.kind)

    def load(self, base: str | Path, *, options: LoadOptions = CPU_FP32) -> torch.nn.Module:
        """The expert as one model: the base with the adapter merged in, or the fine-tuned checkpoint."""
        return EXPERT_KINDS.get(self.kind).load(base, self.folder, options)

    def open(self, base: str | Path, *, options: LoadOptions = CPU_FP32) -> torch.nn.Module:
        """The expert as evaluation tools (lm-eval) take it: a LoRA adapter stays an adapter on the base, unmerged."""
        kind = EXPERT_KINDS.get(self.kind)
        return (kind.open or kind.load)(base, self.folder, options)

    def deltas(self, base: str | Path) -> dict[str, Delta]:
        """What training changed, keyed by the base's tensor names."""
        return EXPERT_KINDS.get(self.kind).deltas(base, self.folder)

    def touches(self, base: str | Path) -> list[str]:
        """The base tensors training changed (what a SkillPack of this expert can touch), in the base's names."""
        kind = EXPERT_KINDS.get(self.kind)
        return kind.touches(base, self.folder) if kind.touches else list(kind.deltas(base, self.folder))


def full_deltas(base: str | Path, expert: str | Path) -> dict[str, torch.Tensor]:
    """θ_expert − θ_base (fp32) for every floating-point tensor that changed, read tensor by tensor.

    The expert must be of the base's architecture (`model_type` in config.json) and hold exactly the
    base's tensors with the same shapes (CheckpointError naming the first that differs): a checkpoint of
    another architecture is not a fine-tune of this base, and a tensor the base lacks has no delta.
    """
    return dict(_changed(base, expert))


def full_delta_keys(base: str | Path, expert: str | Path) -> list[str]:
    """The tensors `full_deltas` would hold, found one tensor at a time (memory: two tensors, not the delta)."""
    return [key for key, _ in _changed(base, expert)]


def _changed(base: str | Path, expert: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    kinds = [_model_type(base), _model_type(expert)]
    if None not in kinds and kinds[0] != kinds[1]:
        raise CheckpointError(f"{expert}: a {kinds[1]} checkpoint is not a fine-tune of {base}, a {kinds[0]}")
    b, e = CheckpointReader(base), CheckpointReader(expert)
    for key in e.keys():
        if key not in b:
            raise CheckpointError(f"{expert}: tensor {key!r} is not in the base {base}; not a fine-tune of it")
    for key in b.keys():
        if key not in e:
            raise CheckpointError(f"{expert}: tensor {key!r} of the base is missing; not a fine-tune of {base}")
        if b.shape(key) != e.shape(key):
            raise CheckpointError(f"{expert}: tensor {key!r} has shape {e.shape(key)}, the base's is {b.shape(key)}")
    for key in b.keys():
        before = b.get(key)
        if not before.is_floating_point():
            continue
        delta = e.get(key).float() - before.float()
        if bool(delta.abs().max() > 0):
            yield key, delta


def _model_type(folder: str | Path) -> str | None:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise CheckpointError(f"{config}: not a readable JSON object") from None


def _load_full(base: str | Path, expert: str | Path, options: LoadOptions) -> torch.nn.Module:
    weight_files(expert)  # safetensors only: a folder of pickles is refused by name (also when `expert` is not a folder)
    return load_causal_lm(expert, options)


EXPERT_KINDS.register("lora")(ExpertKind(
    load=lambda base, folder, options: load_with_adapter(base, folder, options=options),
    deltas=lambda base, folder: dict(read_lora_deltas(folder)),
    open=lambda base, folder, options: load_adapter(load_with_adapter(base, None, options=options), folder),
    touches=lambda base, folder: list(read_lora_deltas(folder))))
EXPERT_KINDS.register("full")(ExpertKind(load=_load_full, deltas=lambda base, folder: dict(full_deltas(base, folder)),
                                         touches=full_delta_keys))
EXPERT_KINDS.register("sparse")(ExpertKind(load=load_sparse, deltas=lambda base, folder: dict(read_sparse_deltas(folder, base))))
