"""Fingerprints of a base model, so a SkillPack can check what it is applied to.

A fingerprint holds the architecture (config fields), the names and shapes of the tensors a pack
touches, and the SHA-256 of every byte of each of those tensors (with its dtype and shape).
Different architecture or shapes: the pack cannot apply. Same shapes, different weights: the base
drifted (e.g. a newer version of the same model), which is allowed only when asked for, and reported
tensor by tensor.

Hashing streams each tensor from disk in chunks. A `DigestCache` keeps the digests of a weight file
keyed by its path, size and modification time, so fingerprinting a large base again costs nothing
until the file changes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from graft.atomic import atomic_write_text
from graft.checkpoint import CheckpointReader
from graft.safetensors_io import NAMES

ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size",
               "n_embd", "n_layer", "intermediate_size", "num_attention_heads", "num_key_value_heads")
CHUNK = 16 * 1024**2


def _digest_head(dtype: str, shape: list[int] | tuple[int, ...]) -> hashlib._Hash:
    h = hashlib.sha256()
    h.update(f"{dtype}{list(shape)}".encode())
    return h


def tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor in memory: dtype, shape and bytes (equal to `file_tensor_digest` of it saved)."""
    h = _digest_head(NAMES[t.dtype], list(t.shape))
    if t.numel():
        h.update(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def file_tensor_digest(reader: CheckpointReader, key: str) -> str:
    """SHA-256 of one stored tensor: dtype, shape and every byte, read from disk in chunks."""
    path, entry = reader.location(key)
    h = _digest_head(reader.dtype_name(key), reader.shape(key))
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = entry.begin
        while pos < entry.end:
            chunk = os.pread(fd, min(CHUNK, entry.end - pos), pos)
            if not chunk:
                raise ValueError(f"{path}: file ended inside tensor {key!r}")
            h.update(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


class DigestCache:
    """Tensor digests per weight file, kept in `folder` and valid while the file's size and mtime hold."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def _entry_path(self, weight_file: Path) -> Path:
        return self.folder / (hashlib.sha256(str(weight_file.resolve()).encode()).hexdigest()[:32] + ".json")

    def digests(self, reader: CheckpointReader, keys: list[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(reader.location(k)[0], []).append(k)
        for path, file_keys in by_file.items():
            st = path.stat()
            stamp = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            entry_path = self._entry_path(path)
            known: dict[str, str] = {}
            try:
                saved = json.loads(entry_path.read_text())
                if isinstance(saved, dict) and saved.get("stamp") == stamp and isinstance(saved.get("digests"), dict):
                    known = {k: v for k, v in saved["digests"].items() if isinstance(v, str)}
            except (OSError, ValueError):
                pass
            missing = [k for k in file_keys if k not in known]
            for k in missing:
                known[k] = file_tensor_digest(reader, k)
            if missing:
                try:
                    atomic_write_text(entry_path, json.dumps({"stamp": stamp, "digests": known}))
                except OSError:
                    pass  # an unwritable cache only costs a rehash next time
            out.update({k: known[k] for k in file_keys})
        return out


def tensor_digests(reader: CheckpointReader, keys: list[str], cache: DigestCache | None = None) -> dict[str, str]:
    """{tensor: SHA-256} for `keys` of the checkpoint behind `reader` (cached when a cache is given)."""
    if cache is not None:
        return cache.digests(reader, sorted(keys))
    return {k: file_tensor_digest(reader, k) for k in sorted(keys)}


def base_fingerprint(reader: CheckpointReader, keys: list[str], cache: DigestCache | None = None) -> dict:
    """Architecture, shapes and per-tensor SHA-256 of `keys` in the checkpoint behind `reader`."""
    cfg = reader.config()
    return {
        "architecture": {f: cfg[f] for f in ARCH_FIELDS if f in cfg},
        "shapes": {k: reader.shape(k) for k in sorted(keys)},
        "tensors_sha256": tensor_digests(reader, keys, cache),
    }


def fit_problems(expected: dict, reader: CheckpointReader) -> list[str]:
    """Why something fingerprinted `expected` cannot apply to the checkpoint behind `reader` (architecture, names, shapes)."""
    problems = []
    cfg = reader.config()
    for f, v in expected["architecture"].items():
        if cfg.get(f) != v:
            problems.append(f"config.json {f} is {cfg.get(f)!r}, the pack was made for {v!r}")
    for k, shape in expected["shapes"].items():
        if k not in reader:
            problems.append(f"tensor {k!r} is missing from the base")
        elif reader.shape(k) != shape:
            problems.append(f"tensor {k!r} has shape {reader.shape(k)}, the pack was made for {shape}")
    return problems


def drifted_tensors(expected: dict, actual_digests: dict[str, str]) -> list[str]:
    """The tensors whose bytes differ from the fingerprint's."""
    return sorted(k for k, d in expected["tensors_sha256"].items() if actual_digests.get(k) != d)


def compare(expected: dict, reader: CheckpointReader, cache: DigestCache | None = None) -> tuple[list[str], list[str]]:
    """(hard problems, drifted tensors) of applying something fingerprinted `expected` to `reader`."""
    problems = fit_problems(expected, reader)
    if problems:
        return problems, []
    return [], drifted_tensors(expected, tensor_digests(reader, list(expected["shapes"]), cache))
