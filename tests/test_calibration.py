import torch

from graft.calibration import input_scales
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.lora import LowRankDelta
from graft.skillpack import PackSettings, pack_skill


def test_input_scales_are_rms_of_each_linear_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(4, 3))

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids)

    wrap = Wrap()
    xs = [torch.randn(2, 5, 4) * torch.tensor([1.0, 2.0, 0.5, 3.0]) for _ in range(3)]
    scales = input_scales(wrap, [{"input_ids": x, "labels": None} for x in xs], ["inner.proj.weight", "inner.missing.weight"])
    assert list(scales) == ["inner.proj.weight"]
    expected = torch.cat([x.reshape(-1, 4) for x in xs]).pow(2).mean(0).sqrt()
    torch.testing.assert_close(scales["inner.proj.weight"], expected)


def test_calibrated_pack_keeps_the_directions_inputs_use(base_model):
    """At no more rank, SVD of Δ·diag(s) loses far less of Δx on inputs scaled by s than plain SVD does."""
    reader = CheckpointReader(base_model)
    key = "model.layers.0.mlp.up_proj.weight"
    out_f, in_f = reader.shape(key)
    g = torch.Generator().manual_seed(0)
    delta = LowRankDelta(key=key, A=torch.randn(8, in_f, generator=g), B=torch.randn(out_f, 8, generator=g), scale=1.0)
    scale = torch.ones(in_f)
    scale[: in_f // 8] = 20.0  # a few channels carry almost all of the input
    x = torch.randn(512, in_f, generator=g) * scale
    fp = base_fingerprint(reader, [key])
    plain = pack_skill("s", {key: delta}, fp, PackSettings(energy=0.6, bits=(8,), band_fractions=(1.0,)))
    calibrated = pack_skill("s", {key: delta}, fp, PackSettings(energy=0.9, bits=(8,), band_fractions=(1.0,)),
                            input_scales={key: scale})
    assert 0 < calibrated.manifest["tensors"][key]["rank"] <= plain.manifest["tensors"][key]["rank"] < 8
    assert calibrated.manifest["tensors"][key]["calibrated"] and calibrated.manifest["settings"]["calibrated"]

    def err(pack):
        return ((delta.dense() - pack.delta(key)) @ x.T).norm() / (delta.dense() @ x.T).norm()

    assert err(calibrated) < 0.5 * err(plain)
    exact = pack_skill("s", {key: delta}, fp, PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,)), input_scales={key: scale})
    torch.testing.assert_close(exact.delta(key), delta.dense(), atol=0.05 * delta.dense().abs().max().item(), rtol=0)
