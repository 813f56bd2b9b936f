"""A written adapter or checkpoint is refused, with one line naming the folder and tensor, when it is not whole."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.model_checks import ModelCheckError, check_adapter, check_checkpoint, check_lora_targets
from tests.conftest import make_adapter

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def refused(fn, *args, match: str) -> str:
    with pytest.raises(ModelCheckError, match=match) as e:
        fn(*args)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)
    return str(e.value)


@pytest.fixture
def adapter_copy(adapter, tmp_path) -> Path:
    return Path(shutil.copytree(adapter, tmp_path / "adapter"))


def rewrite(folder: Path, name: str, change) -> None:
    tensors = load_file(str(folder / name))
    change(tensors)
    save_file(tensors, str(folder / name), metadata={"format": "pt"})


def test_a_whole_adapter_passes(adapter, base_model):
    assert check_adapter(adapter, base_model) == 2 * 3 * 2  # A and B for q, v, down in each of 2 layers


@pytest.mark.parametrize("change, match", [
    (lambda t: t.__setitem__(A, torch.empty(0)), f"tensor {A} has shape \\[0\\], expected \\[4, "),  # an ungathered ZeRO-3 save
    (lambda t: t.pop(B), f"missing tensor {B}"),
    (lambda t: t.__setitem__(A, torch.zeros(2, t[A].shape[1])), f"tensor {A} has shape \\[2, .*rank 4"),
    (lambda t: t.__setitem__(A.replace("q_proj", "k_proj"), t[A].clone()), "k_proj.lora_A.weight belongs to no module the adapter targets"),
    (lambda t: t[B].fill_(float("nan")), f"tensor {B} holds NaN"),
])
def test_a_damaged_adapter_is_refused_naming_the_tensor(adapter_copy, base_model, change, match):
    rewrite(adapter_copy, "adapter_model.safetensors", change)
    assert str(adapter_copy) in refused(check_adapter, adapter_copy, base_model, match=match)


def test_an_adapter_with_pickles_or_without_weights_is_refused(adapter_copy, base_model):
    (adapter_copy / "adapter_model.bin").write_bytes(b"not read")
    refused(check_adapter, adapter_copy, base_model, match="pickle weights 'adapter_model.bin'")
    (adapter_copy / "adapter_model.bin").unlink()
    (adapter_copy / "adapter_model.safetensors").unlink()
    refused(check_adapter, adapter_copy, base_model, match="no adapter_model.safetensors")


def test_an_adapter_for_modules_the_base_lacks_is_refused(adapter_copy, base_model):
    config = json.loads((adapter_copy / "adapter_config.json").read_text())
    (adapter_copy / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["no_such_proj"]}))
    refused(check_adapter, adapter_copy, base_model, match="no_such_proj")


def test_an_empty_rank_or_a_target_matching_nothing_is_caught_before_training(base_model, tmp_path):
    assert len(check_lora_targets(base_model, ["q_proj", "v_proj"])) == 4
    refused(check_lora_targets, base_model, ["no_such_proj"], match="no_such_proj.*not found")
    # a rank-0 adapter of the right layout is still refused: its tensors are empty
    folder = make_adapter(base_model, tmp_path / "r1", rank=1)
    rewrite(folder, "adapter_model.safetensors", lambda t: t.update({k: v[:0] if "lora_A" in k else v[:, :0] for k, v in t.items()}))
    refused(check_adapter, folder, base_model, match="has shape \\[0, ")


@pytest.fixture
def model_copy(base_model, tmp_path) -> Path:
    return Path(shutil.copytree(base_model, tmp_path / "model"))


def test_a_whole_checkpoint_passes(base_model, model_copy):
    assert check_checkpoint(model_copy, base_model) == len(load_file(str(base_model / "model.safetensors")))


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("change, match", [
    (lambda t: t.__setitem__(Q, torch.empty(0)), f"tensor {Q} has shape \\[0\\], expected"),
    (lambda t: t.pop(Q), f"missing tensor {Q}"),
    (lambda t: t.__setitem__("model.extra.weight", torch.ones(2)), "tensor model.extra.weight is not in"),
    (lambda t: t[Q].fill_(float("inf")), f"tensor {Q} holds NaN or inf"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_tensor(base_model, model_copy, change, match):
    rewrite(model_copy, "model.safetensors", change)
    assert str(model_copy) in refused(check_checkpoint, model_copy, base_model, match=match)


def test_a_checkpoint_that_does_not_load_or_holds_pickles_is_refused(base_model, model_copy):
    (model_copy / "config.json").write_text("{}")
    refused(check_checkpoint, model_copy, base_model, match="does not load")
    (model_copy / "pytorch_model.bin").write_bytes(b"not read")
    refused(check_checkpoint, model_copy, base_model, match="pickle weights 'pytorch_model.bin'")
