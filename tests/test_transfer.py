"""GraftLLM cross-model transfer: checked source answers, full-SFT experts and their dense deltas, the recipe end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from graft.checkpoint import CheckpointError
from graft.distill import DistillError, check_can_generate, filter_answers
from graft.expert_packing import pack_expert
from graft.experts import Expert, full_deltas
from graft.skillpack import PackSettings, SkillPack
from pipelines.recipes import check_job
from pipelines.spec import SpecError, parse_job
from tests.conftest import make_base, reverse_skill, run_job_file

ROWS = [{"prompt": "r:abc=", "answer": "cba"}, {"prompt": "r:xy=", "answer": "yx"}, {"prompt": "r:q=", "answer": "q"}]


def test_exact_keeps_the_source_answers_that_match_and_counts_the_rest():
    d = filter_answers(ROWS, ["cba", "xx", ""], "exact")
    assert d.rows == [{"prompt": "r:abc=", "answer": "cba"}] and d.keep == [True, False, False]
    assert d.stats() == {"prompts": 3, "kept": 1, "dropped": 2, "empty": 1, "rejected": 1, "kept_fraction": 1 / 3}


def test_nonempty_keeps_the_source_answer_once_per_prompt_without_references():
    rows = [{"prompt": "p"}, {"prompt": "p"}, {"prompt": "q"}, {"prompt": "r"}]
    d = filter_answers(rows, ["a", "b", "  ", "c"], "nonempty")
    assert d.rows == [{"prompt": "p", "answer": "a"}, {"prompt": "r", "answer": "c"}]
    assert (d.empty, d.rejected) == (1, 1)


@pytest.mark.parametrize("answers, checker, rows, message", [
    (["", " ", ""], "exact", ROWS, "every one of 3 answers is empty"),
    (["no", "no", "no"], "exact", ROWS, "none of 3 answers passed checker 'exact'; the source does not have this skill"),
    (["a"], "exact", [{"prompt": "p"}], "checker 'exact' needs a reference 'answer' in every row; row 0 has none"),
])
def test_a_source_that_teaches_nothing_is_refused(answers, checker, rows, message):
    with pytest.raises(DistillError, match=message):
        filter_answers(rows, answers, checker, source="src")


def test_a_tokenizer_without_eos_cannot_be_a_source(base_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    check_can_generate(tok, "ok")
    tok.eos_token = None
    with pytest.raises(DistillError, match="src: the tokenizer has no eos token"):
        check_can_generate(tok, "src")


def finetuned_copy(base: Path, folder: Path, changes: dict[str, torch.Tensor]) -> Path:
    shutil.copytree(base, folder)
    weights = folder / "model.safetensors"
    state = load_file(weights)
    for key, delta in changes.items():
        state[key] = state[key] + delta
    save_file(state, weights)
    return folder


def test_a_full_experts_delta_is_what_changed_tensor_by_tensor(base_model, tmp_path):
    key = "model.layers.0.mlp.down_proj.weight"
    shape = load_file(base_model / "model.safetensors")[key].shape
    change = torch.randn(shape) * 0.01
    expert = finetuned_copy(base_model, tmp_path / "ft", {key: change})
    deltas = Expert(expert, "full").deltas(base_model)
    assert list(deltas) == [key] and torch.allclose(deltas[key], change, atol=1e-6)
    assert full_deltas(base_model, expert).keys() == {key}


def test_a_checkpoint_of_another_shape_is_not_a_fine_tune(base_model, tmp_path):
    other = make_base(tmp_path / "qwen", family="qwen2")
    with pytest.raises(CheckpointError, match="not a fine-tune of|has shape"):
        full_deltas(base_model, other)
    with pytest.raises(ValueError, match="unknown expert kind 'dense'; known: full, lora"):
        Expert(tmp_path, "dense")


def test_a_full_delta_packs_within_its_byte_budget_and_grafts_back(base_model, tmp_path):
    state = load_file(base_model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    changes = {k: torch.randn(v.shape[0], 2, generator=g) @ torch.randn(2, v.shape[1], generator=g) * 0.02  # low rank, like a fine-tune's
               for k, v in state.items() if "proj" in k and "layers.0" in k}
    expert = Expert(finetuned_copy(base_model, tmp_path / "ft", changes), "full")
    deltas = expert.deltas(base_model)
    pack = pack_expert("reverse", base_model, expert, deltas, PackSettings(budget=1 / 15, bits=(4,), band_fractions=(1.0,)))
    m = pack.manifest
    assert m["total_bytes"] <= m["delta_bf16_bytes"] / 15
    loaded = SkillPack.load(pack.save(tmp_path / "pack"))
    for key, delta in deltas.items():
        err = (loaded.delta(key) - delta).norm() / delta.norm()
        assert err < 0.2, (key, float(err))


# the recipe's checks ------------------------------------------------------------------------------------------------


def spec(**sections):
    return parse_job({"name": "t", "recipe": "transfer", "skills": [{"name": "reverse"}], **sections}, "job.yaml")


@pytest.mark.parametrize("sections, line", [
    ({}, "job.yaml: distill.source: 'testbed:source-hetero' is not built by this job: add 'source-hetero' to testbed.models"),
    ({"testbed": {"models": ["base-v1"]}, "distill": {"source": "testbed:nope"}},
     "job.yaml: distill.source: unknown testbed model 'nope'"),
    ({"distill": {"source": "/no/such/model"}}, "job.yaml: distill.source: /no/such/model: no such checkpoint folder"),
])
def test_validate_names_a_testbed_source_the_job_does_not_build(sections, line):
    with pytest.raises(SpecError) as e:
        check_job(spec(**sections), "job.yaml")
    assert e.value.lines[0].startswith(line)


def test_the_transfer_job_validates_and_a_graft_job_may_not_set_distill():
    assert check_job(spec(testbed={"models": ["base-v1", "source-hetero"]}), "job.yaml").name == "transfer"
    graft_job = parse_job({"name": "t", "skills": [{"name": "reverse"}], "distill": {"checker": "nonempty"}}, "job.yaml")
    with pytest.raises(SpecError, match="distill: not used by recipe 'graft'"):
        check_job(graft_job, "job.yaml")
    with pytest.raises(SpecError, match="distill.checker: unknown answer checker 'fuzzy'"):
        spec(distill={"checker": "fuzzy"})


# end to end ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_transfer_recipe_end_to_end_from_a_source_of_another_family(tmp_path):
    """A local Llama base learns from a local Qwen2 source's answers (full SFT), and its own delta is packed and grafted."""
    base = make_base(tmp_path / "base")
    source = make_base(tmp_path / "source", seed=3, family="qwen2")
    train, test = reverse_skill(tmp_path)
    job = {"name": "xfer", "recipe": "transfer", "base": str(base), "output_dir": str(tmp_path / "runs"),
           "tracking": {"experiment": "xfer"}, "skills": [{"name": "rev", "train": str(train), "eval": str(test)}],
           "distill": {"source": str(source), "checker": "nonempty", "max_new_tokens": 4, "actors": 1, "batch_size": 4},
           # ZeRO-3 with every parameter partitioned: the full model must be gathered before it is saved
           "train": {"method": "full", "steps": 3, "batch_size": 4, "warmup_steps": 1, "lr": 1e-3,
                     "deepspeed": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}},
           "score": {"examples": 4, "shards": 1}, "pack": {"budget": 0.2, "bits": [4], "band_fractions": [1.0]},
           "evaluate": {"max_new_tokens": 4}}
    proc = run_job_file(tmp_path, job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "xfer"
    (distilled,) = (root / "distill").glob("rev-*")
    stats = json.loads((distilled / "distill.json").read_text())
    kept = [json.loads(line) for line in (distilled / "train.jsonl").read_text().splitlines()]
    assert stats["prompts"] == 8 and stats["kept"] == len(kept) > 0 and all(r["answer"].strip() for r in kept)
    (expert,) = (root / "train").glob("rev-*")
    assert (expert / "config.json").is_file() and not (expert / "adapter_config.json").exists()  # a full checkpoint
    assert json.loads((expert / "train_info.json").read_text())["zero_stage"] == 3
    saved, original = load_file(expert / "model.safetensors"), load_file(base / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}
    (pack,) = (root / "pack").glob("rev-*")
    manifest = json.loads((pack / "skillpack.json").read_text())
    assert manifest["source"]["expert_kind"] == "full"
    assert manifest["total_bytes"] <= 0.2 * manifest["delta_bf16_bytes"]
    report = json.loads(next((root / "evaluate").glob("report-*/eval.json")).read_text())
    assert set(report) == {"base", "expert-rev", "grafted"}
    # the same job with DPO after the SFT: testbed, distill and train are reused; dpo trains on from the SFT checkpoint
    proc = run_job_file(tmp_path, {**job, "recipe": "transfer-dpo",
                                   "dpo": {"steps": 3, "batch_size": 2, "warmup_steps": 1, "lr": 1e-3, "actors": 1,
                                           "max_new_tokens": 4, "generate_batch_size": 4}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train/rev: reusing" in proc.stdout + proc.stderr
    (tuned,) = (root / "dpo").glob("rev-*")
    pairs = [json.loads(line) for line in (tuned / "pairs.jsonl").read_text().splitlines()]
    kept_answer = {r["prompt"]: r["answer"] for r in kept}
    assert pairs and all(p["chosen"] == kept_answer[p["prompt"]] != p["rejected"] for p in pairs)
    assert all(isinstance(p["ref_chosen"], float) and p["ref_chosen"] <= 0 for p in pairs)
    summary = json.loads((tuned / "dpo.json").read_text())
    assert summary["pairs"] == len(pairs)
    info = json.loads((tuned / "train_info.json").read_text())
    # at most 3 epochs (the default) over the pairs at 2 pairs a worker on 2 workers: the stage's steps are the ones trained
    assert info["mode"] == "full" and info["zero_stage"] == 3 and info["steps"] == summary["steps"] == min(3, -(-3 * len(pairs) // 4))
    after = load_file(tuned / "model.safetensors")
    assert any(not torch.equal(after[k], saved[k]) for k in saved)  # trained on from the SFT weights
    packs = sorted((root / "pack").glob("rev-*"), key=lambda p: p.stat().st_mtime)
    assert json.loads((packs[-1] / "skillpack.json").read_text())["source"]["expert"].startswith(str(root / "dpo"))
