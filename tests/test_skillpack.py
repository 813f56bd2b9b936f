import json
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from graft.artifacts import manifest_hash
from graft.checkpoint import CheckpointError, CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.grafting import graft
from graft.lora import LowRankDelta, load_with_adapter, read_lora_deltas
from graft.quantize import column_grid, dequantize_columns, pack_bits, quantize_columns, round_to_grid, unpack_bits
from graft.skillpack import PackSettings, SkillPack, SkillPackError, energy_rank, pack_skill, rank_bytes, svd_entry_bytes
from tests.conftest import make_adapter, make_base

EXACT = PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,))


def make_pack(base, adapter, settings=EXACT):
    deltas = read_lora_deltas(adapter)
    return pack_skill("s", deltas, base_fingerprint(CheckpointReader(base), list(deltas)), settings)


def test_lora_deltas_match_peft_merge(base_model, adapter):
    merged = load_with_adapter(base_model, adapter).state_dict()
    base = CheckpointReader(base_model)
    deltas = read_lora_deltas(adapter)
    assert len(deltas) == 2 * 3  # 2 layers × q, v, down
    for key, d in deltas.items():
        torch.testing.assert_close(base.get(key) + d.dense(), merged[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_bit_packing_roundtrip_and_size(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    packed = pack_bits(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 1001).long(), codes)


def test_column_quantization_error_shrinks_with_bits():
    x = torch.randn(64, 6)
    errs = [(dequantize_columns(quantize_columns(x, b), b, x.shape) - x).pow(2).mean().sqrt().item() for b in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.01


def test_budget_pack_fits_and_spends_rank_where_the_energy_is(base_model):
    """A budget of about ten directions is met in bytes on disk; the matrix holding most of the energy gets its full rank first."""
    reader = CheckpointReader(base_model)
    keys = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    out_f, in_f = reader.shape(keys[0])
    g = torch.Generator().manual_seed(0)
    deltas = {k: LowRankDelta(key=k, A=torch.randn(8, in_f, generator=g), B=torch.randn(out_f, 8, generator=g), scale=s)
              for k, s in zip(keys, (1.0, 0.05))}
    st = PackSettings(bits=(4,), band_fractions=(1.0,))
    budget = 10 * rank_bytes((out_f, in_f), st) / (2 * 2 * out_f * in_f)
    pack = pack_skill("s", deltas, base_fingerprint(reader, keys), replace(st, budget=budget))
    m = pack.manifest
    assert m["total_bytes"] <= budget * m["delta_bf16_bytes"]
    assert m["total_bytes"] == sum(t.numel() * t.element_size() for t in pack.tensors.values())
    ranks = [m["tensors"][k]["rank"] for k in keys]
    assert all(m["tensors"][k]["bytes"] == svd_entry_bytes((out_f, in_f), r, st) for k, r in zip(keys, ranks))
    assert ranks[0] == 8 and 0 < ranks[1] < 8 and m["settings"]["budget"] == budget
    with pytest.raises(SkillPackError, match="budget"):
        pack_skill("s", {**deltas, "model.embed_tokens.weight": torch.randn(*reader.shape("model.embed_tokens.weight"))},
                   base_fingerprint(reader, keys), PackSettings(budget=0.001))


def test_clipped_grid_rounds_better_than_the_full_range():
    """One outlier per column: the chosen grid clips it and rounds the rest finer than a min–max grid would."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))  # its own draw, whatever ran before
    x[0] = 12.0
    lo, step = column_grid(x, 3)
    full_step = (x.max(0).values - x.min(0).values) / 7
    assert (step.float() < 0.97 * full_step).all()
    rms = (round_to_grid(x, lo, step, 3) * step.float() + lo.float() - x).pow(2).mean().sqrt()
    full = (torch.round((x - x.min(0).values) / full_step) * full_step + x.min(0).values - x).pow(2).mean().sqrt()
    assert rms < full


def test_energy_rank():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1 of 14
    assert energy_rank(s, 9 / 14) == 1 and energy_rank(s, 0.9) == 2 and energy_rank(s, 1.0) == 3


def test_svd_of_factored_delta_is_exact():
    g = torch.Generator().manual_seed(0)
    d = LowRankDelta("w", torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g), 0.5)
    fingerprint = {"architecture": {}, "shapes": {"w.weight": [16, 24]}, "tensors_sha256": {"w.weight": "0" * 64}}
    pack = pack_skill("s", {"w.weight": d}, fingerprint,
                      PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,)))
    entry = pack.manifest["tensors"]["w.weight"]
    assert entry["rank"] == 4 and entry["scheme"] == "svd_quant"
    rel = (pack.delta("w.weight") - d.dense()).norm() / d.dense().norm()
    assert rel < 0.02


def test_pack_graft_matches_merge_and_reloads(base_model, adapter, tmp_path):
    pack = make_pack(base_model, adapter)
    pack.save(tmp_path / "pack")
    loaded = SkillPack.load(tmp_path / "pack")
    on_disk = (tmp_path / "pack" / "pack.safetensors").stat().st_size
    assert loaded.manifest["total_bytes"] <= on_disk < loaded.manifest["total_bytes"] + 64 * 1024
    graft(base_model, [loaded], tmp_path / "grafted")
    merged = load_with_adapter(base_model, adapter).state_dict()
    out = AutoModelForCausalLM.from_pretrained(str(tmp_path / "grafted")).state_dict()
    base = CheckpointReader(base_model)
    for key in loaded.keys():
        change = (merged[key] - base.get(key)).abs().max()
        assert (out[key] - merged[key]).abs().max() < 0.05 * change
    graft(tmp_path / "grafted", [loaded], tmp_path / "ungrafted", scales=[-1.0], allow_base_drift=True)
    back = CheckpointReader(tmp_path / "ungrafted")
    for key in loaded.keys():
        torch.testing.assert_close(back.get(key), base.get(key), atol=1e-5, rtol=0)


def test_compressed_pack_is_smaller_than_bf16_delta(base_model, adapter):
    pack = make_pack(base_model, adapter, PackSettings(energy=0.9, bits=(8, 2), band_fractions=(0.5, 0.5)))
    assert pack.manifest["total_bytes"] * 4 < pack.manifest["delta_bf16_bytes"]


def test_tampered_pack_is_refused(base_model, adapter, tmp_path):
    make_pack(base_model, adapter).save(tmp_path / "pack")
    data = bytearray((tmp_path / "pack" / "pack.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "pack" / "pack.safetensors").write_bytes(bytes(data))
    with pytest.raises(SkillPackError, match="pack.safetensors: checksum mismatch"):
        SkillPack.load(tmp_path / "pack")


def test_edited_manifest_is_refused(base_model, adapter, tmp_path):
    make_pack(base_model, adapter).save(tmp_path / "pack")
    m = json.loads((tmp_path / "pack" / "skillpack.json").read_text())
    m["skill"] = "other"
    (tmp_path / "pack" / "skillpack.json").write_text(json.dumps(m))
    with pytest.raises(SkillPackError, match="content_hash: does not match"):
        SkillPack.load(tmp_path / "pack")


def test_nan_delta_is_refused_naming_tensor():
    bad = LowRankDelta("w", torch.full((2, 4), float("nan")), torch.ones(4, 2), 1.0)
    with pytest.raises(SkillPackError, match="'model.w.weight' holds NaN"):
        pack_skill("s", {"model.w.weight": bad}, {}, EXACT)


def test_base_drift_refused_unless_allowed(base_model, adapter, tmp_path):
    other = make_base(tmp_path / "v2", seed=7)  # same shapes, other weights: a "newer version"
    pack = make_pack(base_model, adapter)
    with pytest.raises(SkillPackError, match="allow-base-drift"):
        graft(other, [pack], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    report = graft(other, [pack], tmp_path / "out", allow_base_drift=True)
    assert report["base_drift"] == {"s": True}


def test_shape_mismatch_refused(base_model, adapter, tmp_path):
    other = make_base(tmp_path / "gpt2", family="gpt2")
    with pytest.raises(SkillPackError, match="does not fit base"):
        graft(other, [make_pack(base_model, adapter)], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pickle_checkpoint_is_refused_not_loaded(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle checkpoints are refused"):
        CheckpointReader(tmp_path)


def test_adapter_reading_other_family(tmp_path):
    base = make_base(tmp_path / "b", family="qwen2")
    ad = make_adapter(base, tmp_path / "a", targets=("q_proj",))
    assert set(read_lora_deltas(ad)) == {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)}


def test_older_pack_formats_are_refused_by_name(base_model, adapter, tmp_path):
    """v2 packs fingerprinted only the leading rows of each tensor: they are refused, not half-trusted."""
    folder = make_pack(base_model, adapter).save(tmp_path / "pack")
    m = json.loads((folder / "skillpack.json").read_text())
    m["format_version"] = 2
    m["content_hash"] = manifest_hash(m)
    (folder / "skillpack.json").write_text(json.dumps(m))
    with pytest.raises(SkillPackError, match=r"skillpack.json: format_version: format v2 is no longer accepted"):
        SkillPack.load(folder)


@pytest.mark.parametrize("bits", [3, 8, "mixed"])
def test_fp32_rounding_to_the_grid_gives_the_exact_codes(bits):
    """On and next to the midpoints between grid points, where an fp32 quotient can round the other way, the
    codes are those of exact (float64) arithmetic, with one bit width or one per column."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 64, generator=g) * 3 + 1
    bits = torch.randint(1, 9, (64,), generator=g) if bits == "mixed" else torch.full((64,), bits)
    lo, step = torch.empty(64, dtype=torch.float16), torch.empty(64, dtype=torch.float16)
    for b in bits.unique().tolist():
        lo[bits == b], step[bits == b] = column_grid(x[:, bits == b], b)
    k = torch.randint(0, 256, x.shape, generator=g).remainder(2 ** bits).double()
    mid = ((k + 0.5) * step.double() + lo.double()).float()
    for xs in (mid, torch.nextafter(mid, torch.tensor(float("inf"))), torch.nextafter(mid, torch.tensor(float("-inf"))), x):
        exact = torch.round((xs.double() - lo.double()) / step.double()).clamp(min=0)
        assert torch.equal(round_to_grid(xs, lo, step, bits), torch.minimum(exact, 2.0 ** bits.double() - 1).long())
