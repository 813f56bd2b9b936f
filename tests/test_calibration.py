import pytest
import torch

from graft.calibration import LayerMoments, input_moments, rms_scales
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.lora import LowRankDelta
from graft.skillpack import PackSettings, SkillPackError, pack_skill


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
