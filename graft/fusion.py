"""Multi-skill fusion (methods.md §1.5): several SkillPacks in one model without erasing each other.

- additive: θ = θ_base + Σ_i Δ̂_i (that is `graft.grafting.graft` with several packs);
- importance-protected: skills are grafted in order, and each new Δ̂_i is zeroed on the entries
  that matter most to what came before — the base's own abilities and skills 1..i-1 — as measured
  by importance scores (e.g. the Fisher diagonal from `graft.importance`). Each earlier score map is
  normalised to unit mean per tensor so skills weigh alike, then the top `protect_fraction` of each
  tensor's entries by accumulated importance are shielded.
- routed: nothing is added to the weights; a small router picks, per prompt, which pack's low-rank
  delta applies on the fly (`graft.routing`), so skills never meet. Its output is a routed-model
  folder rather than a checkpoint.

Each method is registered in FUSIONS as a writer of the fused model into a folder.
"""

from __future__ import annotations


from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from graft.atomic import atomic_dir
from graft.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader
from graft.fingerprint import DigestCache
from graft.grafting import check_pack, checked_record, grafted_tensors, next_record, require_entries, write_grafted
from graft.registry import Registry
from graft.skillpack import SkillPack, SkillPackError

Scores = dict[str, torch.Tensor]
TensorStream = Iterator[tuple[str, torch.Tensor]]
FUSIONS: Registry = Registry("fusion method")


@dataclass(frozen=True)
class FusionSettings:
    """What the fusion methods may use; each reads only its own fields."""

    scale: float = 1.0  # additive
    protect_fraction: float = 0.2  # protected
    base_scores: Scores | None = None  # protected: the base's own importance, optional
    router_prompts: dict[str, list[str]] | None = None  # routed: example prompts per skill, and "none"
    tokenizer: str | Path | None = None  # routed: when the base folder holds no tokenizer
    seed: int = 0
    max_shard_bytes: int = DEFAULT_SHARD_BYTES
    digest_cache: DigestCache | None = None
    allow_base_drift: bool = False  # set by fuse_into: packs may be applied to a base that drifted from theirs


def _write_checkpoint(reader: CheckpointReader, packs: Sequence[SkillPack], scales: list[float], folder: Path,
                      tensors: TensorStream, st: FusionSettings) -> None:
    """The fused weights as a checkpoint that records its packs and scales (graft.grafting.RECORD)."""
    record = next_record(reader, checked_record(reader, st.digest_cache), packs, scales, st.digest_cache)
    write_grafted(reader, folder, tensors, record, st.max_shard_bytes)


@FUSIONS.register("additive")
def write_additive(base: str | Path, reader: CheckpointReader, packs: Sequence[SkillPack], scores: Sequence[Scores | None],
                   folder: Path, st: FusionSettings) -> None:
    """θ_base + scale · Σ_i Δ̂_i, as a checkpoint."""
    scales = [st.scale] * len(packs)
    _write_checkpoint(reader, packs, scales, folder, grafted_tensors(reader, packs, scales), st)


@FUSIONS.register("protected")
def write_protected(base: str | Path, reader: CheckpointReader, packs: Sequence[SkillPack], scores: Sequence[Scores | None],
                    folder: Path, st: FusionSettings) -> None:
    """Packs added in order, each shielded from the top `protect_fraction` of earlier skills' importance."""
    if st.scale != 1.0:
        raise ValueError("protected fusion grafts at scale 1.0")
    tensors = protected_tensors(reader, packs, scores, st.protect_fraction, st.base_scores)
    _write_checkpoint(reader, packs, [1.0] * len(packs), folder, tensors, st)


@FUSIONS.register("routed")
def write_routed(base: str | Path, reader: CheckpointReader, packs: Sequence[SkillPack], scores: Sequence[Scores | None],
                 folder: Path, st: FusionSettings) -> None:
    """A routed model over the packs (graft.routing), its router trained on `router_prompts`."""
    from graft.routing import build_routed

    if not st.router_prompts:
        raise ValueError("routed fusion needs example prompts per skill and for 'none' to train its router")
    build_routed(base, packs, st.router_prompts, seed=st.seed, tokenizer=st.tokenizer, digest_cache=st.digest_cache,
                 allow_base_drift=st.allow_base_drift).write_into(folder)


def _normalised(score: torch.Tensor) -> torch.Tensor:
    mean = score.float().mean()
    return score.float() / mean if mean > 0 else torch.zeros_like(score, dtype=torch.float32)


def protection_mask(importance: torch.Tensor, protect_fraction: float) -> torch.Tensor:
    """Boolean mask of the top `protect_fraction` entries of `importance` (ties broken by order)."""
    if not 0 <= protect_fraction < 1:
        raise ValueError(f"protect_fraction must be in [0, 1), got {protect_fraction}")
    k = int(round(protect_fraction * importance.numel()))
    mask = torch.zeros(importance.numel(), dtype=torch.bool)
    if k:
        mask[importance.reshape(-1).topk(k).indices] = True
    return mask.view_as(importance)


def protected_tensors(reader: CheckpointReader, packs: Sequence[SkillPack], scores: Sequence[Scores | None],
                      protect_fraction: float, base_scores: Scores | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Base tensors with packs added in order, each shielded from what the base and earlier packs need.

    `scores[i]` is the importance map of pack i's skill (needed for every pack but the last);
    `base_scores` the base's own (e.g. Fisher on general data), optional.
    """
    require_entries(reader, packs)
    for key, t in reader.items():
        touching = [i for i, p in enumerate(packs) if key in p]
        if not touching:
            yield key, t
            continue
        acc = t.float()
        seen = _normalised(base_scores[key]) if base_scores is not None and key in base_scores else None
        for i in touching:
            delta = packs[i].delta(key).view_as(acc)
            if seen is not None:
                delta = delta.masked_fill(protection_mask(seen, protect_fraction), 0.0)
            acc += delta
            if i != len(packs) - 1:
                if scores[i] is None or key not in scores[i]:
                    raise SkillPackError(f"no importance scores for tensor {key!r} of pack {packs[i].name!r}")
                s = _normalised(scores[i][key])
                seen = s if seen is None else seen + s
        if not torch.isfinite(acc).all():
            raise SkillPackError(f"grafting tensor {key!r} produced NaN or Inf")
        yield key, acc.to(t.dtype)


def fuse_into(base: str | Path, packs: Sequence[SkillPack], scores: Sequence[Scores | None], folder: Path,
              method: str = "additive", settings: FusionSettings = FusionSettings(), allow_base_drift: bool = False) -> dict:
    """Fuse `packs` into `base` with a registered method, into an existing folder (caller owns atomicity)."""
    if len(scores) != len(packs):
        raise ValueError(f"{len(packs)} packs but {len(scores)} score maps")
    reader = CheckpointReader(base)
    record = checked_record(reader, settings.digest_cache)
    drift = {p.name: check_pack(p, reader, allow_base_drift, settings.digest_cache, record) for p in packs}
    FUSIONS.get(method)(base, reader, packs, scores, folder, replace(settings, allow_base_drift=allow_base_drift))
    return {"base": str(base), "packs": [p.name for p in packs], "method": method, "scale": settings.scale,
            "protect_fraction": settings.protect_fraction, "base_drift": drift}


def graft_protected(base: str | Path, packs: Sequence[SkillPack], scores: Sequence[Scores | None], out: str | Path,
                    protect_fraction: float = 0.2, base_scores: Scores | None = None, allow_base_drift: bool = False,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> dict:
    """Importance-protected grafting of `packs` (in order) into `base`, written atomically to `out`."""
    inputs = [base, *(p.folder for p in packs if p.folder is not None)]
    with atomic_dir(out, overwrite=overwrite, inputs=inputs, kind="grafted") as tmp:
        report = fuse_into(base, packs, scores, tmp, "protected", FusionSettings(
            protect_fraction=protect_fraction, base_scores=base_scores, max_shard_bytes=max_shard_bytes), allow_base_drift)
    return {**report, "out": str(out)}
