"""lm-evaluation-harness beside graftline's own evaluator: the same rows give the same completions and the same score,
for a base, an expert with its LoRA adapter unmerged, and a routed model; task lists are checked before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoTokenizer

from graft.evaluation import exact_match, generate_answers
from graft.experts import Expert
from graft.harness import (HarnessError, generations, metrics_of, run_tasks, select_tasks, skill_task_name, task_problems,
                           write_skill_task)
from graft.lora import load_with_adapter
from graft.testbed.skills import generate
from pipelines.spec import load_job
from tests.conftest import run_cli
from tests.test_routing import forced, random_pack

MAX_NEW = 8


def half_known(model, tok, skill: str, n: int = 16) -> list[dict[str, str]]:
    """Held-out rows of `skill` where every other answer is the model's own greedy completion: its exact match is
    at least one half by construction, so agreement is measured on rows it gets right and rows it gets wrong."""
    rows = generate(skill, "test", n, 0)
    own = generate_answers(model, tok, [r["prompt"] for r in rows], MAX_NEW)
    return [dict(r, answer=own[i]) if i % 2 == 0 else r for i, r in enumerate(rows)]


def lm_eval_on(model, tok, rows, folder: Path, skill: str = "reverse") -> tuple[float, list[str]]:
    task = write_skill_task(skill, rows, folder, MAX_NEW)
    res = run_tasks(model, tok, select_tasks([str(task)]), limit=None, batch_size=64, samples=True)
    return metrics_of(res)[skill_task_name(skill)]["exact_match"], generations(res, skill_task_name(skill))


@pytest.fixture(scope="module")
def tok(base_model):
    return AutoTokenizer.from_pretrained(str(base_model))


def test_lm_eval_completes_and_scores_a_base_as_graftline_does(base_model, tok, tmp_path):
    model = load_with_adapter(base_model, None)
    rows = half_known(model, tok, "reverse")
    ours = exact_match(model, tok, rows, MAX_NEW)
    theirs, completions = lm_eval_on(model, tok, rows, tmp_path)
    assert ours >= 0.5
    assert completions == generate_answers(model, tok, [r["prompt"] for r in rows], MAX_NEW)
    assert theirs == ours


def test_an_expert_is_evaluated_with_its_adapter_unmerged_and_agrees_with_the_merged_one(base_model, adapter, tok, tmp_path):
    expert = Expert(adapter, "lora")
    unmerged, merged = expert.open(base_model), expert.load(base_model)
    assert type(unmerged).__name__ == "PeftModel" and hasattr(unmerged, "peft_config")
    rows = half_known(merged, tok, "sort")
    theirs, _ = lm_eval_on(unmerged, tok, rows, tmp_path, "sort")
    assert abs(theirs - exact_match(merged, tok, rows, MAX_NEW)) * len(rows) <= 1


def test_a_routed_model_is_measured_routed(base_model, tok, tmp_path):
    packs = [random_pack(base_model, s, i + 1) for i, s in enumerate(("reverse", "add"))]
    routed = forced(base_model, packs, "reverse")
    rows = half_known(routed, tok, "reverse")
    theirs, completions = lm_eval_on(routed, tok, rows, tmp_path)
    with torch.no_grad():
        assert completions == generate_answers(routed, tok, [r["prompt"] for r in rows], MAX_NEW)
        plain = generate_answers(load_with_adapter(base_model, None), tok, [r["prompt"] for r in rows], MAX_NEW)
    assert completions != plain  # the pack's delta was applied: lm-eval saw the routed model, not its base
    assert theirs == exact_match(routed, tok, rows, MAX_NEW)


def test_task_entries_that_cannot_run_are_named(tmp_path):
    (tmp_path / "bad.yaml").write_text("task: [unclosed\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    cases = {str(tmp_path / "missing.yaml"): "missing.yaml: no such task YAML file",
             str(tmp_path / "bad.yaml"): "bad.yaml: not a readable task YAML",
             str(tmp_path / "empty"): "empty: a folder without lm-eval task YAMLs",
             str(tmp_path / "notask.yaml"): "notask.yaml: a task YAML needs a `task`"}
    for entry, message in cases.items():
        with pytest.raises(HarnessError, match=message):
            select_tasks([entry])


def test_an_unknown_task_and_a_dataset_that_does_not_load_are_named_before_any_model(tmp_path):
    task = write_skill_task("add", generate("add", "test", 4, 0), tmp_path / "tasks", MAX_NEW)
    cfg = yaml.safe_load(task.read_text())
    cfg["task"], cfg["dataset_kwargs"]["data_files"]["test"] = "gone", str(tmp_path / "nowhere.jsonl")
    (tmp_path / "tasks" / "gone.yaml").write_text(yaml.safe_dump(cfg))
    selection = select_tasks([str(task), str(tmp_path / "tasks" / "gone.yaml")])
    assert selection.names == (skill_task_name("add"), "gone") and not selection.defaults
    problems = task_problems(selection)
    assert len(problems) == 1 and problems[0].startswith("task 'gone': its dataset cannot be loaded here")
    unknown = select_tasks(["no_such_task_anywhere"])
    assert unknown.defaults
    assert task_problems(type(unknown)(unknown.names, (str(tmp_path / "tasks"),), False)) == [
        "task 'no_such_task_anywhere': unknown to lm-eval (not in the job's task files)"]


def test_export_tasks_writes_the_testbed_split_the_job_evaluates(tmp_path):
    out = tmp_path / "tasks"
    proc = run_cli("export-tasks", out, "--skills", "add", "vocab")
    assert proc.returncode == 0, proc.stderr
    spec = load_job("jobs/demo.yaml")
    for skill in ("add", "vocab"):
        cfg = yaml.safe_load((out / f"{skill_task_name(skill)}.yaml").read_text())
        assert cfg["output_type"] == "generate_until" and cfg["metric_list"][0]["metric"] == "exact_match"
        data = Path(cfg["dataset_kwargs"]["data_files"]["test"])
        assert data.parent == out.resolve()
        want = [{"prompt": r["prompt"], "answer": r["answer"]} for r in generate(skill, "test", spec.testbed.eval_examples, spec.seed)]
        assert [json.loads(line) for line in data.read_text().splitlines()] == want
    again = run_cli("export-tasks", out)
    assert again.returncode == 2 and again.stderr.strip().endswith("already exists; pass --overwrite to replace a folder graftline wrote")
