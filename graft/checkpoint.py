"""HF checkpoint folders in safetensors, read and written tensor by tensor.

Reading parses each shard's header once and reads a tensor only when asked for, straight into its
own memory (`graft.safetensors_io`). Writing fills one shard at a time and flushes it, so peak memory
is one output shard plus the tensors in flight, not the model; when the output layout is known in
advance (`stream_shards`), not even a shard waits in memory. Pickle checkpoints (`.bin`, `.pt`, ...) are refused, never unpickled.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from graft.atomic import atomic_dir
from graft.safetensors_io import NAMES, SafetensorsError, Slot, TensorEntry, read_header, read_range, read_tensor, stream_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# graftline's records about a folder, which describe that folder only: a copy's own are written anew
NOT_COPIED = ("_graftline.json", "graftline_grafts.json", "graftline.sig")


class CheckpointError(ValueError):
    """A checkpoint folder that graftline refuses to read; the message names the file or tensor."""


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of an HF checkpoint folder; refuses folders that only hold pickles."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a checkpoint folder")
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: weight_map: expected a mapping of tensor names to shard files") from None
        for n in names:
            if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors") or not (folder / n).is_file():
                raise CheckpointError(f"{index}: weight_map: {n!r} is not a .safetensors file in {folder}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{pickles[0]}: pickle checkpoints are refused (never unpickled); convert it to safetensors")
    raise CheckpointError(f"{folder}: no *.safetensors weights found")


class CheckpointReader:
    """Lazy, tensor-by-tensor access to the weights of a safetensors checkpoint folder."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._where: dict[str, Path] = {}
        self._entries: dict[str, TensorEntry] = {}
        for f in weight_files(self.folder):
            try:
                entries, _ = read_header(f)
            except (OSError, SafetensorsError) as e:
                raise CheckpointError(str(e) if isinstance(e, SafetensorsError) else f"{f}: {e}") from None
            for k, entry in entries.items():
                self._where[k] = f
                self._entries[k] = entry

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return list(self._entries[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def dtype_name(self, key: str) -> str:
        return NAMES[self._entries[key].dtype]

    def location(self, key: str) -> tuple[Path, TensorEntry]:
        """The file holding tensor `key` and the tensor's byte range in it."""
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: no tensor {key!r}")
        return self._where[key], self._entries[key]

    def get(self, key: str) -> torch.Tensor:
        """The tensor, in memory of its own (writable; the file is not mapped)."""
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: no tensor {key!r}")
        return read_tensor(self._where[key], self._entries[key])

    def get_range(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, read without touching the rest."""
        if key not in self._where:
            raise CheckpointError(f"{self.folder}: no tensor {key!r}")
        return read_range(self._where[key], self._entries[key], start, stop)

    def _storage_order(self) -> list[str]:
        return sorted(self._where, key=lambda k: (str(self._where[k]), self._entries[k].begin))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor, file by file in storage order (sequential reads)."""
        for k in self._storage_order():
            yield k, self.get(k)

    def layout(self) -> list[Slot]:
        """Name, shape and dtype of every tensor in `items()` order: what a same-shaped output streams into."""
        return [Slot(k, self._entries[k].shape, self._entries[k].dtype) for k in self._storage_order()]

    def config(self) -> dict:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def copy_side_files(src: str | Path, dst: str | Path) -> None:
    """Copy config, tokenizer and other non-weight files of an HF folder (never pickles, nor graftline's own records)."""
    for p in Path(src).iterdir():
        if p.is_file() and p.suffix not in (".safetensors", *PICKLE_SUFFIXES) and p.name not in (INDEX_NAME, *NOT_COPIED):
            shutil.copy2(p, Path(dst) / p.name)


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Write (name, tensor) pairs into safetensors shards of at most `max_shard_bytes` each."""
    current: dict[str, torch.Tensor] = {}
    size = 0
    names: list[list[str]] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            tmp_name = f"shard-{len(names):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in current.items()}, str(folder / tmp_name), metadata={"format": "pt"})
            names.append(list(current))
            current, size = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        size += nbytes
    flush()
    finals = _shard_names(len(names))
    for i, final in enumerate(finals):
        (folder / f"shard-{i:05d}.safetensors").rename(folder / final)
    if len(finals) > 1:
        _write_index(folder, {k: f for f, keys in zip(finals, names) for k in keys}, sum((folder / f).stat().st_size for f in finals))


def _shard_names(count: int) -> list[str]:
    return ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=1))


def stream_shards(folder: Path, slots: list[Slot], tensors: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int) -> None:
    """Like `write_shards` for a layout known in advance: each tensor goes to disk as it arrives.

    `tensors` must come in the order of `slots`, each with the slot's shape and dtype.
    """
    groups: list[list[Slot]] = []
    size = 0
    for slot in slots:
        if not groups or (groups[-1] and size + slot.nbytes > max_shard_bytes):
            groups.append([])
            size = 0
        groups[-1].append(slot)
        size += slot.nbytes
    names = _shard_names(len(groups))
    it = iter(tensors)
    for name, group in zip(names, groups):
        stream_file(folder / name, group, it)
    if len(groups) > 1:
        _write_index(folder, {s.name: n for n, g in zip(names, groups) for s in g}, sum(s.nbytes for s in slots))


def write_checkpoint(out: str | Path, tensors: Iterable[tuple[str, torch.Tensor]], side_files_from: str | Path | None = None,
                     max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write an HF checkpoint folder atomically: weights streamed into shards, side files copied."""
    with atomic_dir(out) as tmp:
        write_shards(tmp, tensors, max_shard_bytes)
        if side_files_from is not None:
            copy_side_files(side_files_from, tmp)
    return Path(out)
