"""Grafting: θ = θ_base + Σ_i s_i · Δ̂_i, streamed tensor by tensor into a new HF checkpoint folder.

Each SkillPack is checked against the base first: a different architecture or tensor shape is
refused; different weights under the same shapes (base drift, e.g. a newer model version) are
refused unless `allow_base_drift`, and then reported. Every entry of every pack must land on a tensor
of the base; none is ever skipped.

A grafted checkpoint records what went into it (`graftline_grafts.json`, `graft.manifests.GraftRecord`):
the packs (skill, content hash, scale), the original base's digests of every tensor they touch, and
the folder's own digests of those tensors, so the record can be checked against the weights it
describes. Grafting onto a grafted checkpoint checks each new pack against the original base the
record names; removing a skill is grafting it with scale −1, and is refused for a pack the record
does not hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from graft.artifacts import ArtifactError, parse_json
from graft.atomic import atomic_dir
from graft.checkpoint import DEFAULT_SHARD_BYTES, CheckpointReader, copy_side_files, stream_shards
from graft.fingerprint import DigestCache, fit_problems, tensor_digest, tensor_digests
from graft.manifests import GRAFTS_FORMAT, GRAFTS_VERSION, GraftedPack, GraftRecord
from graft.skillpack import SkillPack, SkillPackError

RECORD = "graftline_grafts.json"
TensorStream = Iterator[tuple[str, torch.Tensor]]


def read_record(folder: str | Path) -> GraftRecord | None:
    """The graft record of a checkpoint folder, or None for a checkpoint graftline did not graft."""
    path = Path(folder) / RECORD
    if not path.is_file():
        return None
    try:
        return parse_json(path, GraftRecord, "grafted checkpoint")
    except ArtifactError as e:
        raise SkillPackError(str(e)) from None


def checked_record(reader: CheckpointReader, cache: DigestCache | None = None) -> GraftRecord | None:
    """The checkpoint's graft record, after checking that it still describes the checkpoint's weights."""
    record = read_record(reader.folder)
    if record is not None:
        missing = [k for k in record.weights_sha256 if k not in reader]
        if missing:
            raise SkillPackError(f"{reader.folder / RECORD}: weights_sha256: tensor {missing[0]!r} is not in the checkpoint")
        actual = tensor_digests(reader, list(record.weights_sha256), cache)
        changed = [k for k, d in record.weights_sha256.items() if actual[k] != d]
        if changed:
            raise SkillPackError(f"{reader.folder / RECORD}: no longer describes the checkpoint (tensor {changed[0]!r} "
                                 "changed after graftline wrote it)")
    return record


def original_digests(reader: CheckpointReader, record: GraftRecord | None, keys: Sequence[str],
                     cache: DigestCache | None = None) -> dict[str, str]:
    """Digests of `keys` in the base before any recorded graft: the record's, else the checkpoint's own."""
    recorded = record.base_sha256 if record is not None else {}
    fresh = tensor_digests(reader, [k for k in keys if k not in recorded], cache)
    return {k: recorded.get(k) or fresh[k] for k in keys}


def check_pack(pack: SkillPack, reader: CheckpointReader, allow_base_drift: bool, cache: DigestCache | None = None,
               record: GraftRecord | None = None) -> bool:
    """Raise if `pack` cannot apply to the base; return True when the base weights drifted.

    On a grafted checkpoint (`record` given), the weights compared are the original base's.
    """
    where = pack.folder or pack.name
    fp = pack.manifest["base_fingerprint"]
    problems = fit_problems(fp, reader)
    if problems:
        raise SkillPackError(f"{where}: does not fit base {reader.folder}: {problems[0]}")
    missing = [k for k in pack.keys() if k not in fp["shapes"]]
    if missing:
        raise SkillPackError(f"{where}: tensor {missing[0]!r} is not in the pack's base fingerprint")
    digests = original_digests(reader, record, list(fp["tensors_sha256"]), cache)
    drifted = sorted(k for k, d in fp["tensors_sha256"].items() if digests[k] != d)
    if drifted and not allow_base_drift:
        raise SkillPackError(f"{where}: base {reader.folder} differs from the base the pack was made for "
                             f"(tensor {drifted[0]!r} changed); pass --allow-base-drift to apply it anyway")
    return bool(drifted)


def require_entries(reader: CheckpointReader, packs: Sequence[SkillPack]) -> None:
    """Raise, naming the pack and tensor, when a pack entry has no tensor of its shape in the base."""
    for pack in packs:
        for key in pack.keys():
            if key not in reader:
                raise SkillPackError(f"{pack.folder or pack.name}: tensor {key!r} is not in the base {reader.folder}")
            if reader.shape(key) != list(pack.manifest["tensors"][key]["shape"]):
                raise SkillPackError(f"{pack.folder or pack.name}: tensor {key!r} has shape {pack.manifest['tensors'][key]['shape']}, "
                                     f"the base's is {reader.shape(key)}")


def grafted_tensors(reader: CheckpointReader, packs: Sequence[SkillPack], scales: Sequence[float]) -> TensorStream:
    """The base's tensors with every pack's scaled delta added, one tensor at a time (every pack entry lands)."""
    require_entries(reader, packs)
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


def write_grafted(reader: CheckpointReader, folder: Path, tensors: TensorStream, record: GraftRecord,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    """Stream `tensors` into `folder` as the base's layout, copy its side files, and write `record`
    with the digests of the tensors it covers as they were written."""
    written: dict[str, str] = {}

    def digesting() -> TensorStream:
        for key, t in tensors:
            if key in record.base_sha256:
                written[key] = tensor_digest(t)
            yield key, t

    stream_shards(folder, reader.layout(), digesting(), max_shard_bytes)
    copy_side_files(reader.folder, folder)
    final = record.model_copy(update={"weights_sha256": written})
    GraftRecord.model_validate(final.model_dump())
    (folder / RECORD).write_text(json.dumps(final.model_dump(mode="json"), indent=1))


def next_record(reader: CheckpointReader, before: GraftRecord | None, packs: Sequence[SkillPack], scales: Sequence[float],
                cache: DigestCache | None = None) -> GraftRecord:
    """The record of `before`'s checkpoint after grafting `packs` at `scales` (negative: removing them)."""
    kept = list(before.packs) if before is not None else []
    added = []
    for pack, scale in zip(packs, scales):
        h = pack.digest
        if scale < 0:
            match = next((i for i, g in enumerate(kept) if g.pack_sha256 == h), None)
            if match is None:
                raise SkillPackError(f"{pack.folder or pack.name}: pack {pack.name!r} is not recorded as grafted into "
                                     f"{reader.folder} ({RECORD}); nothing to remove")
            if abs(kept[match].scale + scale) > 1e-9:
                raise SkillPackError(f"{pack.folder or pack.name}: pack {pack.name!r} was grafted at scale {kept[match].scale:g}, "
                                     f"not {-scale:g}; remove it with --scale {kept[match].scale:g}")
            kept.pop(match)
        else:
            added.append(GraftedPack(skill=pack.name, pack_sha256=h, scale=scale))
    keys = sorted({*(before.base_sha256 if before is not None else {}), *(k for p in packs for k in p.keys())})
    base = original_digests(reader, before, keys, cache)
    return GraftRecord(format=GRAFTS_FORMAT, format_version=GRAFTS_VERSION, packs=kept + added, base_sha256=base,
                       weights_sha256=dict(base))


def graft(base: str | Path, packs: Sequence[SkillPack], out: str | Path, scales: Sequence[float] | None = None,
          allow_base_drift: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
          cache: DigestCache | None = None) -> dict:
    """Write base + packs as an HF checkpoint folder `out` (atomically; never over an input); returns a report."""
    inputs = [base, *(p.folder for p in packs if p.folder is not None)]
    with atomic_dir(out, overwrite=overwrite, inputs=inputs, kind="grafted") as tmp:
        report = graft_into(base, packs, tmp, scales, allow_base_drift, max_shard_bytes, cache)
    return {**report, "out": str(out)}


def graft_into(base: str | Path, packs: Sequence[SkillPack], folder: Path, scales: Sequence[float] | None = None,
               allow_base_drift: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, cache: DigestCache | None = None) -> dict:
    """Like `graft`, into an existing empty folder whose atomicity the caller owns.

    A negative scale removes a pack: it must be recorded in the checkpoint at the opposite scale.
    """
    reader = CheckpointReader(base)
    scales = list(scales) if scales is not None else [1.0] * len(packs)
    if len(scales) != len(packs):
        raise ValueError(f"{len(packs)} packs but {len(scales)} scales")
    before = checked_record(reader, cache)
    drift = {p.name: check_pack(p, reader, allow_base_drift or s < 0, cache, before) for p, s in zip(packs, scales)}
    record = next_record(reader, before, packs, scales, cache)
    write_grafted(reader, folder, grafted_tensors(reader, packs, scales), record, max_shard_bytes)
    return {"base": str(base), "packs": [p.name for p in packs], "scales": scales, "base_drift": drift}
