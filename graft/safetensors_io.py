"""Reading one tensor of a safetensors file into fresh memory, and writing a file tensor by tensor.

The safetensors library reads by memory-mapping the file (every page touched stays in the process's
resident set while the map lives, on top of the copy the caller makes) and writes only whole dicts of
tensors (a shard must sit in memory before it is saved). For merges of models larger than RAM both
cost: here a tensor is read with `pread` straight into its own buffer, and a file whose layout is known
in advance (names, shapes, dtypes: a merge knows them before it computes anything) gets its header
first and then each tensor's bytes as it arrives, so nothing waits in memory for a shard to fill.

The format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N, N
bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}
(padded with spaces), then the tensors' bytes, contiguous, offsets relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024**2  # what the safetensors library itself accepts


class SafetensorsError(ValueError):
    """A safetensors file whose header cannot be trusted; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in a file: its dtype, shape and absolute byte range."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def read_header(path: str | Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of a safetensors file (absolute byte ranges, checked against the file) and its metadata."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise SafetensorsError(f"{path}: header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start, data_len = 8 + n, size - 8 - n
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if not 0 <= begin <= end <= data_len or end - begin != _numel(shape) * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} has byte range [{begin}, {end}) that does not fit "
                                   f"shape {list(shape)} {info['dtype']} in {data_len} data bytes")
        entries[name] = TensorEntry(dtype, shape, start + begin, start + end)
    return entries, metadata


def _pread_into(path: str | Path, t: torch.Tensor, offset: int) -> torch.Tensor:
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise SafetensorsError(f"{path}: file ended inside tensor data at byte {offset + done}")
            done += got
    finally:
        os.close(fd)
    return t


def read_tensor(path: str | Path, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor into newly allocated memory (no mmap: nothing of the file stays resident)."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    return _pread_into(path, t, entry.begin) if entry.nbytes else t


def read_range(path: str | Path, entry: TensorEntry, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the tensor flattened in storage order, as a 1-D tensor of their own."""
    if not 0 <= start <= stop <= _numel(entry.shape):
        raise IndexError(f"{path}: range [{start}, {stop}) outside a tensor of {_numel(entry.shape)} elements")
    t = torch.empty(stop - start, dtype=entry.dtype)
    return _pread_into(path, t, entry.begin + start * entry.dtype.itemsize) if stop > start else t


@dataclass(frozen=True)
class Slot:
    """One tensor a streamed file will hold."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * self.dtype.itemsize


def _header_bytes(slots: Sequence[Slot], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for s in slots:
        header[s.name] = {"dtype": NAMES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as the safetensors library writes it
    return struct.pack("<Q", len(raw)) + raw


def _check(slot: Slot, name: str, t: torch.Tensor, path: Path) -> None:
    if name != slot.name:
        raise ValueError(f"{path}: expected tensor {slot.name!r} next, got {name!r}")
    if tuple(t.shape) != slot.shape or t.dtype != slot.dtype:
        raise ValueError(f"{path}: tensor {name!r} is {list(t.shape)} {t.dtype}, its slot says {list(slot.shape)} {slot.dtype}")


def stream_file(path: str | Path, slots: Sequence[Slot], tensors: Iterable[tuple[str, torch.Tensor]],
                metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose layout is `slots`, taking the tensors from `tensors` in that order.

    Each tensor is written as it arrives and then let go; a tensor out of order, of another shape or
    dtype, or missing, raises (the caller writes into a temporary folder, so nothing half-done survives).
    """
    path = Path(path)
    it = iter(tensors)
    with open(path, "wb") as fh:
        fh.write(_header_bytes(slots, {"format": "pt"} if metadata is None else metadata))
        for slot in slots:
            try:
                name, t = next(it)
            except StopIteration:
                raise ValueError(f"{path}: the tensors ended before {slot.name!r}") from None
            _check(slot, name, t, path)
            if slot.nbytes:
                fh.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t


__all__ = ["DTYPES", "SafetensorsError", "Slot", "TensorEntry", "read_header", "read_range", "read_tensor", "stream_file"]
