"""Recipes and stage contracts: stages wired by the artifact types they read and write."""

from __future__ import annotations

import ast

import pytest
import yaml

from pipelines.artifacts import Board, MissingArtifact, Packs
from pipelines.cache import Ref
from pipelines.cli import main
from pipelines.driver import job_params
from pipelines.recipes import RECIPES, check_job, recipe_of, recipe_problem
from pipelines.spec import COMMON_FIELDS, SPEC_SECTIONS, SpecError, parse_job
from pipelines.stages import STAGES
from tests.conftest import REPO


def test_every_registered_recipe_is_wired_and_every_stage_declares_its_contract():
    assert "graft" in RECIPES
    for name in RECIPES.names():
        assert recipe_problem(list(RECIPES.get(name).stages)) is None
    for stage in STAGES.values():
        assert stage.WRITES and all(isinstance(k, type) for k in (*stage.READS, *stage.WRITES))
        assert set(stage.SECTIONS) <= set(SPEC_SECTIONS), stage.NAME


@pytest.mark.parametrize("stages, problem", [
    (["testbed", "score"], "stage 'score' reads Experts, which no stage before it writes (before it: testbed)"),
    (["train"], "stage 'train' reads Base, which no stage before it writes (before it: none)"),
    (["testbed", "pack", "train"], "stage 'pack' reads Experts"),
    (["testbed", "nope"], "unknown stage 'nope'; known: testbed, distill, train"),
    ([], "at least one stage"),
])
def test_a_recipe_that_cannot_run_is_refused_naming_the_stage_and_artifact(stages, problem):
    assert problem in recipe_problem(stages)


def test_the_default_recipe_is_todays_chain():
    assert recipe_of("graft").stages == ("testbed", "train", "score", "pack", "graft", "evaluate")
    assert parse_job({"name": "j", "skills": [{"name": "reverse"}]}, "j.yaml").recipe == "graft"


def test_a_job_may_set_only_the_sections_its_recipe_reads(tmp_path):
    spec = parse_job({"name": "j", "recipe": ["testbed", "train"], "skills": [{"name": "reverse"}], "pack": {"energy": 0.9}}, "j.yaml")
    with pytest.raises(SpecError) as e:
        check_job(spec, "j.yaml")
    assert e.value.lines == ["j.yaml: pack: not used by recipe 'custom' (its stages: testbed, train)"]
    with pytest.raises(SpecError, match=r"j.yaml: recipe: unknown recipe 'grafting'; known: graft"):
        check_job(parse_job({"name": "j", "recipe": "grafting", "skills": [{"name": "reverse"}]}, "j.yaml"), "j.yaml")


def test_mlflow_params_hold_only_the_recipe_s_sections_and_no_nulls():
    spec = parse_job({"name": "j", "recipe": ["testbed", "train"], "skills": [{"name": "reverse"}]}, "j.yaml")
    params = job_params(spec, recipe_of(spec.recipe))
    assert set(params) <= {*COMMON_FIELDS, "testbed", "train"} and {"testbed", "train", "skills"} <= set(params)
    assert "tokenizer" not in params  # null: left out
    full = job_params(parse_job({"name": "j", "skills": [{"name": "reverse"}]}, "j.yaml"), recipe_of("graft"))
    assert {"score", "pack", "graft", "evaluate"} <= set(full) and "sweep" not in full


def test_the_board_hands_artifacts_by_type():
    board = Board([Packs({"rev": Ref("/p", "k")})])
    assert board.get(Packs)["rev"].key == "k"
    with pytest.raises(MissingArtifact, match="no pack"):
        board.get(Packs)["sort"]
    with pytest.raises(MissingArtifact, match="no Experts artifact"):
        from pipelines.artifacts import Experts

        board.get(Experts)


def test_stages_depend_on_artifact_types_not_on_each_other():
    """In the import graph a stage imports artifacts, the context and the library; never another stage."""
    stage_modules = {f"pipelines.stages.{name}" for name in STAGES}
    for path in (REPO / "pipelines" / "stages").glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        if path.stem != "__init__":
            assert not (imported & stage_modules), f"{path.name} imports {sorted(imported & stage_modules)}"


def test_graft_recipes_lists_each_stage_with_its_artifacts(capsys, tmp_path):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "graft:" in out and "score      reads Base, Datasets, Experts" in out and "writes Scores" in out
    job = tmp_path / "j.yaml"
    job.write_text(yaml.safe_dump({"name": "j", "recipe": ["testbed", "graft"], "skills": [{"name": "reverse"}]}))
    assert main(["validate", str(job)]) == 2
    assert "recipe: stage 'graft' reads Packs, which no stage before it writes (before it: testbed)" in capsys.readouterr().err
