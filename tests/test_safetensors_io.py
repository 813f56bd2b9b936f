"""graft.safetensors_io: direct reads and streamed writes agree with the safetensors library."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from graft.checkpoint import CheckpointError, CheckpointReader, stream_shards
from graft.safetensors_io import SafetensorsError, Slot, read_header, read_range, read_tensor, stream_file

TENSORS = {
    "a": torch.randn(5, 7, generator=torch.Generator().manual_seed(0)),
    "b": torch.randn(3, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).view(2, 3),
    "d": torch.tensor(1.5, dtype=torch.float16),
    "e": torch.zeros(0, 4),
}


def test_reads_what_the_library_wrote(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(TENSORS, str(path))
    entries, meta = read_header(path)
    assert set(entries) == set(TENSORS)
    for name, t in TENSORS.items():
        got = read_tensor(path, entries[name])
        assert got.dtype == t.dtype and torch.equal(got, t), name
    a = entries["a"]
    assert torch.equal(read_range(path, a, 9, 23), TENSORS["a"].reshape(-1)[9:23])
    with pytest.raises(IndexError):
        read_range(path, a, 30, 36)


def test_streamed_file_is_read_by_the_library(tmp_path):
    path = tmp_path / "s.safetensors"
    slots = [Slot(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()]
    stream_file(path, slots, iter(TENSORS.items()))
    with safe_open(str(path), framework="pt") as h:
        assert set(h.keys()) == set(TENSORS)
        for name, t in TENSORS.items():
            assert torch.equal(h.get_tensor(name), t), name


def test_stream_refuses_a_tensor_that_does_not_fit_its_slot(tmp_path):
    slots = [Slot("a", (5, 7), torch.float32), Slot("b", (3,), torch.bfloat16)]
    with pytest.raises(ValueError, match="'b'"):
        stream_file(tmp_path / "x.safetensors", slots, iter([("a", TENSORS["a"]), ("b", torch.zeros(4, dtype=torch.bfloat16))]))
    with pytest.raises(ValueError, match="expected tensor 'a'"):
        stream_file(tmp_path / "y.safetensors", slots, iter([("b", TENSORS["b"])]))
    with pytest.raises(ValueError, match="ended before 'b'"):
        stream_file(tmp_path / "z.safetensors", slots, iter([("a", TENSORS["a"])]))


def test_stream_shards_splits_and_indexes(tmp_path):
    big = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    stream_shards(tmp_path, [Slot(n, (256,), torch.float32) for n in big], iter(big.items()), max_shard_bytes=2048)
    assert len(list(tmp_path.glob("model-*-of-00003.safetensors"))) == 3
    reader = CheckpointReader(tmp_path)
    assert {k: reader.get(k) for k in reader.keys()}.keys() == big.keys()
    assert all(torch.equal(reader.get(k), v) for k, v in big.items())


def test_header_that_lies_about_offsets_is_refused_naming_the_tensor(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8:8 + n].replace(b"[0,16]", b"[0,64]")
    path.write_bytes(raw[:8] + header + raw[8 + n:])
    with pytest.raises(SafetensorsError, match="'w'"):
        read_header(path)
    with pytest.raises(CheckpointError, match="'w'"):
        CheckpointReader(tmp_path)
