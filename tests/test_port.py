"""PortLLM patch porting: fit checks, base drift, the update gap, `graft port`, the version chain, the recipe end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.experts import Expert
from graft.lora import read_lora_deltas
from graft.port import PortError, base_drift, check_fits, ported_model, update_gap
from graft.sparse import read_sparse_deltas
from graft.testbed.recipes import testbed_recipes as recipes_for
from pipelines.recipes import check_job
from pipelines.spec import SpecError, parse_job
from tests.conftest import make_base, reverse_skill, run_cli, run_job_file

Q = "model.layers.0.self_attn.q_proj.weight"


def evolved(base: Path, folder: Path, scale: float = 0.01, seed: int = 0) -> Path:
    """A 'newer version' of `base`: every tensor moved by a little noise."""
    shutil.copytree(base, folder)
    state = load_file(folder / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + scale * torch.randn(v.shape, generator=g) * v.abs().mean() for k, v in state.items()}, folder / "model.safetensors")
    return folder


def test_a_patch_fits_a_new_base_only_with_every_module_it_changes(base_model, adapter, tmp_path):
    deltas = read_lora_deltas(adapter)
    check_fits(deltas, evolved(base_model, tmp_path / "v2"))
    other = make_base(tmp_path / "wide", family="gpt2")
    with pytest.raises(PortError, match=r"has no module 'model\.layers\.0\.(self_attn|mlp)\.\w+'"):
        check_fits(deltas, other)
    reshaped = tmp_path / "reshaped"
    shutil.copytree(base_model, reshaped)
    state = load_file(reshaped / "model.safetensors")
    state[Q] = state[Q][:32]
    save_file(state, reshaped / "model.safetensors")
    with pytest.raises(PortError, match=r"module 'model.layers.0.self_attn.q_proj' has shape \[32, 64\], the patch changes \[64, 64\]"):
        check_fits(deltas, reshaped)


def test_drift_is_the_relative_change_of_each_tensor_under_the_patch(base_model, tmp_path):
    assert base_drift(base_model, base_model, [Q]) == {Q: 0.0}
    moved = tmp_path / "moved"
    shutil.copytree(base_model, moved)
    state = load_file(moved / "model.safetensors")
    state[Q] = state[Q] * 1.5
    save_file(state, moved / "model.safetensors")
    assert base_drift(base_model, moved, [Q])[Q] == pytest.approx(0.5, rel=1e-5)


def test_the_update_gap_and_cosine_of_a_reference_update():
    d = {Q: torch.randn(8, 8)}
    assert update_gap(d, d)[Q] == pytest.approx({"relative_gap": 0.0, "cosine": 1.0}, abs=1e-6)
    assert update_gap(d, {Q: -d[Q]})[Q] == pytest.approx({"relative_gap": 2.0, "cosine": -1.0}, abs=1e-6)
    assert update_gap(d, {"other": d[Q]}) == {}


def test_a_ported_model_is_the_new_base_plus_the_patch(base_model, adapter, tmp_path):
    new = evolved(base_model, tmp_path / "v2")
    deltas = Expert(adapter).deltas(base_model)
    model = ported_model(new, deltas)
    expected = load_file(new / "model.safetensors")[Q] + deltas[Q].dense()
    assert torch.allclose(model.state_dict()[Q], expected, atol=1e-6)


def test_graft_port_writes_a_checkpoint_and_refuses_a_base_it_does_not_fit(base_model, adapter, tmp_path):
    new = evolved(base_model, tmp_path / "v2")
    ok = run_cli("port", adapter, "--from", base_model, "--to", new, "--out", tmp_path / "ported")
    assert ok.returncode == 0, ok.stderr
    report = json.loads((tmp_path / "ported" / "port.json").read_text())
    assert set(report["drift"]) == set(read_lora_deltas(adapter)) and all(0 < v < 0.1 for v in report["drift"].values())
    written = load_file(tmp_path / "ported" / "model.safetensors")[Q]
    assert torch.allclose(written, load_file(new / "model.safetensors")[Q] + read_lora_deltas(adapter)[Q].dense(), atol=1e-6)
    again = run_cli("port", adapter, "--from", base_model, "--to", new, "--out", tmp_path / "ported")
    assert again.returncode == 2 and "exists" in again.stderr
    bad = run_cli("port", adapter, "--from", base_model, "--to", make_base(tmp_path / "gpt2", family="gpt2"), "--out", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "has no module 'model.layers.0." in bad.stderr
    assert not (tmp_path / "x").exists()


def test_the_version_chain_is_as_long_as_asked(tmp_path):
    recipes = recipes_for(["base-v5"], family="llama", size="tiny", seed=0, pretrain_examples=10, pretrain_steps=5, lr=1e-3,
                              evolve_steps=5, align_steps=5, target_steps=5, source_skill="reverse", source_family="qwen2",
                              source_steps=5, source_replay_fraction=0.0, versions=5)
    assert [(r.name, r.parent, r.data.seed) for r in recipes] == [
        ("base-v1", None, 0), ("base-v2", "base-v1", 1), ("base-v3", "base-v2", 2), ("base-v4", "base-v3", 3), ("base-v5", "base-v4", 4)]


@pytest.mark.parametrize("evolve_lr, expected", [(None, 1e-3 / 3), (2e-4, 2e-4)])
def test_evolve_lr_sets_each_new_versions_learning_rate_and_only_theirs(evolve_lr, expected):
    recipes = recipes_for(["base-v3", "aligned-small"], family="llama", size="tiny", seed=0, pretrain_examples=10, pretrain_steps=5,
                          lr=1e-3, evolve_steps=5, align_steps=5, target_steps=5, source_skill="reverse", source_family="qwen2",
                          source_steps=5, source_replay_fraction=0.0, versions=3, evolve_lr=evolve_lr)
    lrs = {r.name: r.lr for r in recipes}
    assert lrs == {"base-v1": 1e-3, "base-v2": pytest.approx(expected), "base-v3": pytest.approx(expected),
                   "aligned-small": pytest.approx(1e-3 / 3)}


def job(**sections):
    return parse_job({"name": "t", "recipe": "port", "skills": [{"name": "reverse"}], **sections}, "job.yaml")


@pytest.mark.parametrize("sections, line", [
    ({"testbed": {"models": ["base-v6"], "versions": 5}},
     "job.yaml: testbed.models: unknown testbed model 'base-v6'; known with versions=5"),
    ({"testbed": {"versions": 12}}, "job.yaml: testbed.versions: "),
])
def test_a_chain_longer_than_the_spec_allows_is_refused(sections, line):
    with pytest.raises(SpecError) as e:
        job(**sections)
    assert e.value.lines[0].startswith(line)


def test_validate_names_a_new_base_the_job_does_not_build():
    with pytest.raises(SpecError) as e:
        check_job(job(port={"to": ["testbed:base-v3"]}), "job.yaml")
    assert e.value.lines == ["job.yaml: port.to: 'testbed:base-v3' is not built by this job: add 'base-v3' to testbed.models"]
    assert check_job(job(testbed={"models": ["base-v1", "base-v2"]}), "job.yaml").name == "port"


@pytest.mark.integration
@pytest.mark.parametrize("reference", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ported", "with-reference"])
def test_port_recipe_end_to_end(tmp_path, reference):
    """A sparse adapter trained on a local base under ZeRO-3, ported to an evolved copy of it, against the copy alone and,
    with a reference (a second Ray Train run, so `make test-all` only), the same sparse adapter trained on it (the LoRA
    path is the pipeline test's; porting a LoRA, test_port's units)."""
    base = make_base(tmp_path / "v1")
    new = evolved(base, tmp_path / "v2", scale=0.05)
    train, test = reverse_skill(tmp_path)
    spec = {"name": "port", "recipe": "port", "base": str(base), "output_dir": str(tmp_path / "runs"),
            "tracking": {"experiment": "port"}, "skills": [{"name": "rev", "train": str(train), "eval": str(test)}],
            # ZeRO-3 with every parameter partitioned: each adapter (the patch, and the reference on the new base) must be
            # gathered before it is saved, or its tensors are written empty
            "train": {"method": "sparse", "steps": 3, "batch_size": 4, "warmup_steps": 1, "zero_stage": 3,
                      "sparse": {"rule": "snip", "keep_fraction": 0.1, "score_batches": 1},
                      "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
            "port": {"to": [str(new)], "reference_finetune": reference}, "evaluate": {"max_new_tokens": 4}}
    proc = run_job_file(tmp_path, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "port"
    (ported,) = (root / "port").glob("rev@v2-*")
    report = json.loads((ported / "port.json").read_text())
    assert report["drift"] and all(0 < v < 0.2 for v in report["drift"].values())
    if reference:
        assert set(report["update_gap"]) == set(report["drift"])
        assert all(-1 <= g["cosine"] <= 1 and g["relative_gap"] >= 0 for g in report["update_gap"].values())
    else:
        assert "update_gap" not in report
    (patch,) = (root / "train").glob("rev-*")
    references = list((root / "port").glob("reference-rev@v2-*"))
    assert len(references) == reference
    for adapter, model in ((patch, base), *((r, new) for r in references)):
        info = json.loads((adapter / "train_info.json").read_text())
        assert info["zero_stage"] == 3 and info["mode"] == "sparse"
        deltas = read_sparse_deltas(adapter, model)
        assert len(deltas) == 14 and sum(d.kept for d in deltas.values()) == info["trainable_parameters"]
        assert all(bool((d.values != 0).any()) for d in deltas.values())  # trained and saved whole
    (evaluated,) = (root / "port_eval").glob("report-*")
    table = json.loads((evaluated / "eval.json").read_text())
    assert set(table) == {"v1/expert", "v2/zero_shot", "v2/ported"} | ({"v2/finetuned"} if reference else set())
    assert (evaluated / "decay.png").stat().st_size > 0
