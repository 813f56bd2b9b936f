"""Base fingerprints over every byte (cached by file stamp), and the graft records that make `remove` honest."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import graft.fingerprint as fingerprint
from graft.checkpoint import CheckpointReader
from graft.fingerprint import DigestCache, base_fingerprint, tensor_digest, tensor_digests
from graft.grafting import RECORD, graft, read_record
from graft.lora import read_lora_deltas
from graft.skillpack import PackSettings, SkillPack, SkillPackError, pack_skill
from tests.conftest import make_adapter

EXACT = PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,))
KEY = "model.layers.1.self_attn.q_proj.weight"


def _copy(base, folder):
    folder.mkdir()
    for p in base.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _pack(base, adapter_folder, name, seed):
    d = read_lora_deltas(make_adapter(base, adapter_folder, seed=seed))
    return pack_skill(name, d, base_fingerprint(CheckpointReader(base), list(d)), EXACT)


def test_the_digest_covers_every_byte_and_equals_the_in_memory_one(base_model, tmp_path):
    reader = CheckpointReader(base_model)
    assert tensor_digests(reader, [KEY])[KEY] == tensor_digest(reader.get(KEY))
    changed = _copy(base_model, tmp_path / "b")
    tensors = load_file(str(changed / "model.safetensors"))
    tensors[KEY][-1, -1] += 1e-3  # the very last element of the tensor
    save_file(tensors, str(changed / "model.safetensors"), metadata={"format": "pt"})
    assert tensor_digests(CheckpointReader(changed), [KEY])[KEY] != tensor_digests(reader, [KEY])[KEY]


def test_the_digest_cache_is_used_until_the_file_changes(base_model, tmp_path, monkeypatch):
    base = _copy(base_model, tmp_path / "b")
    cache = DigestCache(tmp_path / "cache")
    reads = []
    real = fingerprint.file_tensor_digest
    monkeypatch.setattr(fingerprint, "file_tensor_digest", lambda r, k: reads.append(k) or real(r, k))
    first = cache.digests(CheckpointReader(base), [KEY])
    assert reads == [KEY] and cache.digests(CheckpointReader(base), [KEY]) == first and reads == [KEY]
    tensors = load_file(str(base / "model.safetensors"))
    tensors[KEY] *= -5
    save_file(tensors, str(base / "model.safetensors"), metadata={"format": "pt"})
    os.utime(base / "model.safetensors", ns=(1, 1))  # a new stamp, as any rewrite gives
    assert cache.digests(CheckpointReader(base), [KEY]) != first and reads == [KEY, KEY]


def test_grafting_on_a_grafted_checkpoint_checks_against_the_original_base(base_model, tmp_path):
    a, b = _pack(base_model, tmp_path / "a", "a", 1), _pack(base_model, tmp_path / "b", "b", 2)
    graft(base_model, [a], tmp_path / "m1")
    graft(tmp_path / "m1", [b], tmp_path / "m2")  # not "drift": the record names the base both packs were made for
    record = read_record(tmp_path / "m2")
    assert [(g.skill, g.scale) for g in record.packs] == [("a", 1.0), ("b", 1.0)]
    assert record.packs[0].pack_sha256 == a.digest
    graft(tmp_path / "m2", [a], tmp_path / "m3", scales=[-1.0])
    assert [g.skill for g in read_record(tmp_path / "m3").packs] == ["b"]
    with pytest.raises(SkillPackError, match="pack 'a' is not recorded"):
        graft(tmp_path / "m3", [a], tmp_path / "m4", scales=[-1.0])
    both = graft(base_model, [a, b], tmp_path / "ab")
    m3, ab = CheckpointReader(tmp_path / "m3"), CheckpointReader(both["out"])
    for key in b.keys():
        torch.testing.assert_close(m3.get(key), ab.get(key) - (a.delta(key) if key in a else 0), atol=1e-5, rtol=0)


def test_a_pack_is_identified_by_what_it_holds(base_model, tmp_path):
    pack = _pack(base_model, tmp_path / "a", "a", 1)
    loaded = SkillPack.load(pack.save(tmp_path / "pack"))
    assert loaded.digest == pack.digest
    other = _pack(base_model, tmp_path / "c", "a", 3)
    assert other.digest != pack.digest


def test_a_record_that_no_longer_matches_its_weights_is_refused(base_model, tmp_path):
    a = _pack(base_model, tmp_path / "a", "a", 1)
    graft(base_model, [a], tmp_path / "m1")
    record = json.loads((tmp_path / "m1" / RECORD).read_text())
    record["weights_sha256"][next(iter(record["weights_sha256"]))] = "0" * 64
    (tmp_path / "m1" / RECORD).write_text(json.dumps(record))
    with pytest.raises(SkillPackError, match="no longer describes the checkpoint"):
        graft(tmp_path / "m1", [a], tmp_path / "back", scales=[-1.0])
