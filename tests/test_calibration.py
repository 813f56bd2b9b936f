from dataclasses import replace

import pytest
import torch

from graft.calibration import LayerMoments, input_moments, rms_scales
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.lora import LowRankDelta
from graft.quantize import DAMPING, UnusableHessian, column_grid, from_grid, gptq, round_to_grid, rtn
from graft.skillpack import PackSettings, SkillPack, SkillPackError, pack_skill


def test_input_moments_are_second_moments_shared_by_siblings():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q", torch.nn.Linear(4, 3))
    model.add_module("k", torch.nn.Linear(4, 2))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner.q(input_ids) + self.inner.k(input_ids).sum(-1, keepdim=True)

    wrap = Wrap()
    xs = [torch.randn(2, 5, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) for _ in range(3)]
    moments = input_moments(wrap, [{"input_ids": x, "labels": None} for x in xs],
                            ["inner.q.weight", "inner.k.weight", "inner.missing.weight"])
    assert sorted(moments) == ["inner.k.weight", "inner.q.weight"]
    flat = torch.cat([x.reshape(-1, 4) for x in xs])
    torch.testing.assert_close(moments["inner.q.weight"], flat.T @ flat / flat.shape[0])
    assert moments["inner.k.weight"] is moments["inner.q.weight"]  # one input, one matrix
    torch.testing.assert_close(rms_scales(moments["inner.q.weight"]), flat.pow(2).mean(0).sqrt())


def _rank8_delta(base_model, seed: int, scale: float):
    """(reader, key, a rank-8 delta of one MLP matrix, the generator that drew it)."""
    reader = CheckpointReader(base_model)
    key = "model.layers.0.mlp.up_proj.weight"
    out_f, in_f = reader.shape(key)
    g = torch.Generator().manual_seed(seed)
    return reader, key, LowRankDelta(key=key, A=torch.randn(8, in_f, generator=g), B=torch.randn(out_f, 8, generator=g), scale=scale), g


def test_calibrated_pack_keeps_the_directions_inputs_use(base_model):
    """At no more rank, SVD of Δ·diag(s) loses far less of Δx on inputs scaled by s than plain SVD does."""
    reader, key, delta, g = _rank8_delta(base_model, 0, 1.0)
    in_f = delta.shape[1]
    scale = torch.ones(in_f)
    scale[: in_f // 8] = 20.0  # a few channels carry almost all of the input
    x = torch.randn(512, in_f, generator=g) * scale
    fp = base_fingerprint(reader, [key])
    plain = pack_skill("s", {key: delta}, fp, PackSettings(energy=0.6, bits=(8,), band_fractions=(1.0,)))
    moment = torch.diag(scale.pow(2))
    calibrated = pack_skill("s", {key: delta}, fp, PackSettings(energy=0.9, bits=(8,), band_fractions=(1.0,), weighted_svd=True),
                            calibration={key: moment})
    assert 0 < calibrated.manifest["tensors"][key]["rank"] <= plain.manifest["tensors"][key]["rank"] < 8
    assert calibrated.manifest["tensors"][key]["weighted_svd"] and calibrated.manifest["settings"]["calibrated"]

    def err(pack):
        return ((delta.dense() - pack.delta(key)) @ x.T).norm() / (delta.dense() @ x.T).norm()

    assert err(calibrated) < 0.5 * err(plain)
    exact = pack_skill("s", {key: delta}, fp, PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,), weighted_svd=True),
                       calibration={key: moment})
    torch.testing.assert_close(exact.delta(key), delta.dense(), atol=0.05 * delta.dense().abs().max().item(), rtol=0)


def _correlated_inputs(in_f: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Inputs living mostly in a few directions, as real activations do."""
    mix = torch.randn(in_f, in_f, generator=g) * torch.logspace(0, -2, in_f)[None, :]
    return torch.randn(n, in_f, generator=g) @ mix.T


def test_gptq_pack_loses_less_of_the_output_than_round_to_nearest(base_model):
    """At the same rank and bytes (3 bits), GPTQ against the input moment, with U refit to the rounded V, keeps Δx closer."""
    reader, key, delta, g = _rank8_delta(base_model, 1, 0.5)
    x = _correlated_inputs(delta.shape[1], 2048, g)
    moment = x.T @ x / x.shape[0]
    fp = base_fingerprint(reader, [key])
    st = dict(energy=1.0, bits=(3,), band_fractions=(1.0,))
    rtn = pack_skill("s", {key: delta}, fp, PackSettings(**st))
    gptq = pack_skill("s", {key: delta}, fp, PackSettings(**st, quantizer="gptq"), calibration={key: moment})
    assert gptq.manifest["tensors"][key]["quantizer"] == "gptq" and rtn.manifest["tensors"][key]["quantizer"] == "rtn"
    assert gptq.manifest["total_bytes"] == rtn.manifest["total_bytes"]

    def err(pack):
        return ((delta.dense() - pack.delta(key)) @ x.T).norm() / (delta.dense() @ x.T).norm()

    assert err(gptq) < 0.75 * err(rtn)  # measured: 0.19 vs 0.31


def test_calibrated_settings_without_calibration_are_refused(base_model):
    reader = CheckpointReader(base_model)
    key = "model.layers.0.mlp.up_proj.weight"
    out_f, in_f = reader.shape(key)
    delta = LowRankDelta(key=key, A=torch.randn(4, in_f), B=torch.randn(out_f, 4), scale=1.0)
    with pytest.raises(SkillPackError, match="gptq"):
        pack_skill("s", {key: delta}, base_fingerprint(reader, [key]), PackSettings(quantizer="gptq"))
    with pytest.raises(SkillPackError, match=key):
        pack_skill("s", {key: delta}, base_fingerprint(reader, [key]), PackSettings(quantizer="gptq"),
                   calibration={key: torch.eye(in_f + 1)})


def test_layer_moments_hold_one_layer_and_match_the_whole_pass(base_model, adapter):
    """Packing in key order computes each layer's moments once, equal to the all-at-once pass."""
    from graft.data import collated_batches, encode_examples
    from graft.lora import load_with_adapter, read_lora_deltas
    from transformers import AutoTokenizer

    deltas = read_lora_deltas(adapter)
    model = load_with_adapter(base_model, adapter)
    tok = AutoTokenizer.from_pretrained(str(base_model))
    rows = [{"prompt": f"rev {w} =", "answer": f" {w[::-1]}"} for w in ("abc", "hello", "graft", "moon")]
    batches = list(collated_batches(encode_examples(tok, rows, 32), tok.pad_token_id, 2))
    lazy = LayerMoments(model, batches, list(deltas))
    reader = CheckpointReader(base_model)
    pack = pack_skill("s", deltas, base_fingerprint(reader, list(deltas)), PackSettings(bits=(3,), band_fractions=(1.0,),
                      quantizer="gptq", budget=0.3), calibration=lazy)
    layers = {k.rsplit(".", 3)[0] for k in deltas}
    assert lazy.passes == len(layers) == 2
    whole = input_moments(model, batches, list(deltas))
    assert set(whole) == set(lazy) == set(deltas)
    for key in sorted(deltas):
        torch.testing.assert_close(lazy[key], whole[key])
    assert pack.manifest["settings"]["calibrated"]
    assert dict(lazy).keys() == set(deltas)  # a real Mapping: dict() and .keys() work


def _reference_gptq(m: torch.Tensor, bits: list[int], hessian: torch.Tensor, along: str):
    """The GPTQ `graft.quantize.gptq` replaced, as the reference: H inverted in float64, one input
    dimension at a time, every rounding error applied at once to all dimensions not yet rounded."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    bits_t = torch.as_tensor(bits)
    w = m.double().clone()
    codes = torch.zeros_like(w, dtype=torch.long)
    if along == "rows":
        lo, step = torch.empty(m.shape[1], dtype=torch.float16), torch.empty(m.shape[1], dtype=torch.float16)
        for b in bits_t.unique().tolist():
            lo[bits_t == b], step[bits_t == b] = column_grid(m[:, bits_t == b], b)
        for i in range(w.shape[0]):
            codes[i] = round_to_grid(w[i], lo, step, bits_t)
            err = (w[i] - from_grid(codes[i], lo, step).double()) / hinv[i, i]
            w[i + 1:] -= hinv[i, i + 1:, None] * err[None, :]
        return codes, lo, step
    lo, step = torch.empty(w.shape[1], dtype=torch.float16), torch.empty(w.shape[1], dtype=torch.float16)
    for j in range(w.shape[1]):
        lo[j:j + 1], step[j:j + 1] = column_grid(w[:, j:j + 1], bits[j])
        codes[:, j] = round_to_grid(w[:, j], lo[j], step[j], bits[j])
        err = (w[:, j] - from_grid(codes[:, j], lo[j], step[j]).double()) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
    return codes, lo, step


def _output_error(m: torch.Tensor, rounded, hessian: torch.Tensor, along: str) -> float:
    """E‖error of the product‖² on inputs of second moment H: tr(Eᵀ H E), E over the input dimensions."""
    e = (from_grid(*rounded) - m).double()
    e = e if along == "rows" else e.T
    return float(torch.einsum("ik,ij,jk->", e, hessian.double(), e))


@pytest.fixture(scope="module")
def gptq_case():
    """A random 96×200 matrix, 200 inputs of correlated activations' second moment (two GPTQ blocks), mixed bits."""
    g = torch.Generator().manual_seed(0)
    m = torch.randn(96, 200, generator=g)
    x = _correlated_inputs(200, 800, g)
    return m, x.T @ x / x.shape[0], [4] * 100 + [3] * 100


@pytest.mark.parametrize("along", ["rows", "cols"])
def test_blocked_fp32_gptq_matches_the_float64_reference(gptq_case, along):
    """Blocked fp32 GPTQ loses no more of the output than the float64 one-row-at-a-time algorithm, on the same grids."""
    m, h, bits = gptq_case
    m = m.T.contiguous() if along == "rows" else m  # the 200 inputs are V's rows, U's columns
    bits = bits[: m.shape[1]]
    ours, ref = gptq(m, bits, h, along), _reference_gptq(m, bits, h, along)
    assert _output_error(m, ours, h, along) <= 1.01 * _output_error(m, ref, h, along)
    same_grid = (ours[1] == ref[1]) & (ours[2] == ref[2])
    assert same_grid.all() if along == "rows" else same_grid.float().mean() >= 0.95  # "cols": grids follow the updates
    assert (ours[0] == ref[0]).float().mean() > 0.95


@pytest.mark.parametrize("along", ["rows", "cols"])
def test_gptq_loses_less_of_the_output_than_round_to_nearest(gptq_case, along):
    m, h, bits = gptq_case
    m = m.T.contiguous() if along == "rows" else m
    bits = bits[: m.shape[1]]
    assert _output_error(m, gptq(m, bits, h, along), h, along) < 0.8 * _output_error(m, rtn(m, bits), h, along)


def test_gptq_refuses_a_moment_it_cannot_use():
    """No moment, a non-finite one, or one not positive definite even with the retry's damping: UnusableHessian, saying which."""
    m = torch.randn(8, 3)
    with pytest.raises(UnusableHessian, match="no calibration moment"):
        gptq(m, [4] * 3, None)
    with pytest.raises(UnusableHessian, match="NaN or Inf"):
        gptq(m, [4] * 3, torch.full((8, 8), float("nan")))
    with pytest.raises(UnusableHessian, match="not positive definite"):
        gptq(m, [4] * 3, -torch.eye(8))
    with pytest.raises(ValueError, match="8×8"):
        gptq(m, [4] * 3, torch.eye(3))


@pytest.mark.slow
def test_gptq_runs_at_layer_width():
    """A 4096×4096 matrix against a 4096×4096 moment: the blocked sweep, no row loop over the outputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4608, 4096, generator=g)
    m = torch.randn(4096, 4096, generator=g)
    codes, lo, step = gptq(m, [4] * 4096, x.T @ x / x.shape[0], "rows")
    assert codes.shape == m.shape and int(codes.max()) <= 15


def test_gptq_fallbacks_are_named_in_the_manifest(base_model, tmp_path):
    """A matrix without a moment, and one whose moment GPTQ cannot factorize, are rounded to nearest, and the
    manifest's warnings say which and why; the pack still saves and loads, and a clean pack has no warnings."""
    from pipelines.stages.pack import _pack_warnings

    reader = CheckpointReader(base_model)
    g = torch.Generator().manual_seed(0)
    keys = [f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 1)] + ["model.layers.0.self_attn.q_proj.weight"]
    deltas = {}
    for k in keys:
        out_f, in_f = reader.shape(k)
        deltas[k] = LowRankDelta(key=k, A=torch.randn(4, in_f, generator=g), B=torch.randn(out_f, 4, generator=g), scale=1.0)
    fp = base_fingerprint(reader, keys)
    x = _correlated_inputs(64, 512, g)
    good = x.T @ x / x.shape[0]
    st = PackSettings(energy=1.0, bits=(3,), band_fractions=(1.0,), quantizer="gptq")
    pack = pack_skill("s", deltas, fp, st, calibration={keys[0]: good, keys[2]: -torch.eye(64)})
    entries = pack.manifest["tensors"]
    assert entries[keys[0]]["quantizer"] == "gptq" and "fallback" not in entries[keys[0]]
    assert entries[keys[1]]["quantizer"] == entries[keys[2]]["quantizer"] == "rtn"
    assert pack.manifest["warnings"] == sorted([  # in key order
        f"{keys[1]}: gptq fell back to round-to-nearest (no calibration moment)",
        f"{keys[2]}: gptq fell back to round-to-nearest (the 64×64 input second moment is not positive definite "
        "in fp32 even with damping 0.1 of its mean diagonal)"])
    plain = pack_skill("s", deltas, fp, replace(st, quantizer="rtn"))
    for k in keys[1:]:
        assert torch.equal(pack.delta(k), plain.delta(k))  # the fallback is exactly round-to-nearest
    pack.save(tmp_path / "pack")
    assert SkillPack.load(tmp_path / "pack").manifest["warnings"] == pack.manifest["warnings"]
    assert _pack_warnings(tmp_path / "pack") == pack.manifest["warnings"]
    clean = pack_skill("s", {keys[0]: deltas[keys[0]]}, base_fingerprint(reader, keys[:1]), st, calibration={keys[0]: good})
    assert clean.manifest["warnings"] == []


def test_refit_of_a_wide_moment_runs_in_fp32_and_agrees_with_float64(monkeypatch):
    """Above REFIT_FP64_MAX entries the refit's large products take fp32 (only the r x r solve stays float64);
    the U it finds is the float64 one to fp32 precision, for a dense and a low-rank delta."""
    import graft.skillpack as skillpack

    gen = torch.Generator().manual_seed(4)
    d_out, d_in, r = 48, 64, 6
    x = torch.randn(512, d_in, generator=gen) * torch.linspace(0.2, 3.0, d_in)
    moment = x.T @ x / x.shape[0]
    v = torch.linalg.qr(torch.randn(d_in, r, generator=gen)).Q
    low_rank = LowRankDelta("m.weight", torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen), 0.5)
    for delta in (torch.randn(d_out, d_in, generator=gen), low_rank):
        wide_u, wide_hz = skillpack._refit_u(delta, v, moment)
        monkeypatch.setattr(skillpack, "REFIT_FP64_MAX", moment.numel() - 1)
        narrow_u, narrow_hz = skillpack._refit_u(delta, v, moment)
        monkeypatch.setattr(skillpack, "REFIT_FP64_MAX", 1 << 22)
        assert wide_hz.dtype == narrow_hz.dtype == torch.float64 and narrow_u.dtype == torch.float32
        assert not torch.equal(narrow_u, wide_u)  # the fp32 path really ran
        torch.testing.assert_close(narrow_u, wide_u, rtol=1e-4, atol=1e-5)
