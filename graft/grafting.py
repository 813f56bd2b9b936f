"""Grafting: θ = θ_base + Σ_i s_i · Δ̂_i, streamed tensor by tensor into a new HF checkpoint folder.

Each SkillPack is checked against the base first: a different architecture or tensor shape is
refused; different weights under the same shapes (base drift, e.g. a newer model version) are
refused unless `allow_base_drift`, and then reported. Removing a skill is grafting it with scale −1.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from graft.atomic import atomic_dir
from graft.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, copy_side_files, stream_shards
from graft.fingerprint import compare
from graft.skillpack import SkillPack, SkillPackError


def check_pack(pack: SkillPack, reader: CheckpointReader, allow_base_drift: bool) -> bool:
    """Raise if `pack` cannot apply to the base; return True when the base weights drifted."""
    where = pack.folder or pack.name
    problems, drifted = compare(pack.manifest["base_fingerprint"], reader)
    if problems:
        raise SkillPackError(f"{where}: does not fit base {reader.folder}: {problems[0]}")
    if drifted and not allow_base_drift:
        raise SkillPackError(f"{where}: base {reader.folder} differs from the base the pack was made for "
                             "(weights changed); pass --allow-base-drift to apply it anyway")
    return drifted


def grafted_tensors(reader: CheckpointReader, packs: Sequence[SkillPack], scales: Sequence[float]) -> Iterator[tuple[str, torch.Tensor]]:
    """The base's tensors with every pack's scaled delta added, one tensor at a time."""
    for key, t in reader.items():
        touching = [(p, s) for p, s in zip(packs, scales) if key in p]
        if not touching:
            yield key, t
            continue
        acc = t.float()
        for pack, scale in touching:
            acc += scale * pack.delta(key).view_as(acc)
        if not torch.isfinite(acc).all():
            raise SkillPackError(f"grafting tensor {key!r} produced NaN or Inf")
        yield key, acc.to(t.dtype)


def graft(base: str | Path, packs: Sequence[SkillPack], out: str | Path, scales: Sequence[float] | None = None,
          allow_base_drift: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Write base + packs as an HF checkpoint folder `out` (atomically); returns a report."""
    with atomic_dir(out) as tmp:
        report = graft_into(base, packs, tmp, scales, allow_base_drift, max_shard_bytes)
    return {**report, "out": str(out)}


def graft_into(base: str | Path, packs: Sequence[SkillPack], folder: Path, scales: Sequence[float] | None = None,
               allow_base_drift: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict:
    """Like `graft`, into an existing empty folder whose atomicity the caller owns."""
    reader = CheckpointReader(base)
    scales = list(scales) if scales is not None else [1.0] * len(packs)
    if len(scales) != len(packs):
        raise ValueError(f"{len(packs)} packs but {len(scales)} scales")
    drift = {p.name: check_pack(p, reader, allow_base_drift) for p in packs}
    stream_shards(folder, reader.layout(), grafted_tensors(reader, packs, scales), max_shard_bytes)
    copy_side_files(base, folder)
    return {"base": str(base), "packs": [p.name for p in packs], "scales": scales, "base_drift": drift}
