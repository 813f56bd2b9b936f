"""What a graft cost: every job names where retained general ability is measured, the report shows each model's drop
against the base in points, and a bad general source or harness task is refused at validation, naming it."""

from __future__ import annotations

import json

import pytest

from graft.data import split_holdout
from pipelines.evaluation import general_source
from pipelines.recipes import check_job
from pipelines.report import accuracy_table, general_drops
from pipelines.spec import SpecError, parse_job
from tests.conftest import make_base


def rows(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"q{i}=", "answer": f"a{i}"} for i in range(n)]


def write(path, data) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def spec_of(**sections):
    return parse_job({"name": "g", "skills": [{"name": "add"}], **sections}, "g.yaml")


def problems_of(**sections) -> list[str]:
    try:
        check_job(spec_of(**sections), "g.yaml")
    except SpecError as e:
        return e.lines
    return []


@pytest.fixture(scope="module")
def user_base(tmp_path_factory):
    return str(make_base(tmp_path_factory.mktemp("user-base")))


def test_a_replay_file_is_split_so_its_held_out_tail_never_trains():
    kept, held = split_holdout(rows(50))
    assert (len(kept), len(held)) == (45, 5) and kept + held == rows(50)
    assert len(split_holdout(rows(5000))[1]) == 200 and len(split_holdout(rows(3))[1]) == 1
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_holdout(rows(1))


def test_the_general_source_follows_the_documented_order(tmp_path, user_base):
    replay = write(tmp_path / "replay.jsonl", rows(20))
    none = write(tmp_path / "none.jsonl", rows(10))
    assert general_source(spec_of()).dataset == "general"  # a testbed base: the testbed's own general data
    user = {"base": user_base}
    assert general_source(spec_of(**user, train={"replay_data": replay, "replay_fraction": 0.2})).dataset == replay
    assert general_source(spec_of(**user, graft={"router_none": none})).file == none
    assert general_source(spec_of(**user)).dataset == "general"  # router_none's default, a testbed skill
    assert general_source(spec_of(**user, evaluate={"general": "arc_easy"})).task == "arc_easy"
    assert general_source(spec_of(**user, evaluate={"general": none})).file == none
    assert general_source(spec_of(evaluate={"general": "vocab"})).dataset == "vocab"


def test_a_general_file_without_answers_or_a_harness_task_that_cannot_run_is_refused_naming_it(tmp_path, user_base):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    lines = problems_of(base=user_base, graft={"router_none": str(prompts)})
    assert len(lines) == 1 and lines[0].startswith(f"g.yaml: evaluate.general: {prompts} (graft.router_none): {prompts}:1: each "
                                                   "line needs string fields 'prompt' and 'answer'")
    lines = problems_of(evaluate={"harness": [str(tmp_path / "missing.yaml")]})
    assert lines == [f"g.yaml: evaluate.harness: {tmp_path / 'missing.yaml'}: no such task YAML file"]


def test_the_report_shows_each_models_general_drop_in_points():
    table = {"base": {"add": 0.0, "general": 0.9}, "expert-add": {"add": 1.0, "general": 0.88},
             "grafted": {"add": 0.95, "general": 0.8}}
    drops = general_drops(table)
    assert drops == {"expert-add": 2.0, "grafted": 10.0}
    text = accuracy_table(table, drops).splitlines()
    assert text[0].split() == ["model", "add", "general", "general", "drop", "(points)"]
    assert text[-1].split() == ["grafted", "0.950", "0.800", "+10.0"]
    assert general_drops({"base": {"add": 0.1}}) == {}
