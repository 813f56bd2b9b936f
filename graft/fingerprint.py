"""Fingerprints of a base model, so a SkillPack can check what it is applied to.

A fingerprint holds the architecture (config fields), the names and shapes of the tensors a pack
touches, and a hash of the leading rows of those tensors. Different architecture or shapes: the
pack cannot apply. Same shapes, different weights: the base drifted (e.g. a newer version of the
same model), which is allowed only when asked for, and reported.
"""

from __future__ import annotations

import hashlib
import math

import torch

from graft.checkpoint import CheckpointReader

ARCH_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size",
               "n_embd", "n_layer", "intermediate_size", "num_attention_heads", "num_key_value_heads")
HASH_ROWS = 16


def _leading_rows(reader: CheckpointReader, key: str) -> bytes:
    shape = reader.shape(key)
    rows = min(HASH_ROWS, shape[0]) if shape else 1
    t = reader.get_range(key, 0, rows * math.prod(shape[1:]))
    return t.to(torch.float32).numpy().tobytes()


def base_fingerprint(reader: CheckpointReader, keys: list[str]) -> dict:
    """Architecture, shapes and a weights hash of `keys` in the checkpoint behind `reader`."""
    cfg = reader.config()
    h = hashlib.sha256()
    for k in sorted(keys):
        h.update(k.encode())
        h.update(_leading_rows(reader, k))
    return {
        "architecture": {f: cfg[f] for f in ARCH_FIELDS if f in cfg},
        "shapes": {k: reader.shape(k) for k in sorted(keys)},
        "weights_sha256": h.hexdigest(),
    }


def compare(expected: dict, reader: CheckpointReader) -> tuple[list[str], bool]:
    """(hard problems, weights drifted) of applying something fingerprinted `expected` to `reader`."""
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
    if problems:
        return problems, False
    return [], base_fingerprint(reader, list(expected["shapes"]))["weights_sha256"] != expected["weights_sha256"]
