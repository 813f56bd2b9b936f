"""The judgements behind the browser checks and benchmarks/ux.py, on made-up input (no browser, no job): run order
against a recipe, and a console's progress lines, silences and summary width."""

from __future__ import annotations

from benchmarks.ux import Console, Line, headers, progress_lines, silences, summary_width
from tests.ui_checks import in_pipeline_order, runs_link

STAGES = ["testbed", "train", "evaluate"]
STAGE_OF = {"t1": "testbed", "t2": "testbed", "r1": "train", "r2": "train", "e1": "evaluate"}


def test_children_in_the_recipes_order_pass_whatever_else_is_listed():
    assert in_pipeline_order(["t2", "t1", "r1", "r2", "e1", "parent"], STAGE_OF, STAGES) == (True, "")
    assert in_pipeline_order(["parent", "other-job", "t1", "t2", "r2", "r1", "e1"], STAGE_OF, STAGES) == (True, "")


def test_a_child_out_of_order_missing_or_of_an_unknown_stage_fails_and_says_which():
    ok, why = in_pipeline_order(["e1", "r2", "r1", "t2", "t1"], STAGE_OF, STAGES)
    assert not ok and why == "'train' run r2 listed after 'evaluate' run e1"
    assert in_pipeline_order(["t1", "t2", "r1", "e1"], STAGE_OF, STAGES) == (False, "1 of the job's 5 child runs not listed")
    ok, why = in_pipeline_order(["t1", "t2", "r1", "r2", "e1"], {**STAGE_OF, "e1": "score"}, STAGES)
    assert not ok and "'score'" in why


def test_runs_link_carries_the_uis_query():
    assert runs_link("http://h:5000/", "7") == "http://h:5000/#/experiments/7/runs"
    assert runs_link("http://h:5000", "7", "a=1") == "http://h:5000/#/experiments/7/runs?a=1"


def console(*lines: tuple[float, str, str], exit_t: float = 30.0) -> Console:
    return Console([Line(t, s, x) for t, s, x in lines], exit_t, 0)


RUN = console(
    (1.0, "stdout", "graftline: job 'demo'"),
    (2.0, "stdout", "[1/3] testbed"),
    (2.5, "stderr", "(raylet) noise"),
    (9.0, "stdout", "[2/3] train"),
    (10.0, "stdout", "  starting 2 training workers"),
    (12.0, "stderr", "(RayTrainWorker) noise"),
    (20.0, "stdout", "  reverse (job 1/1): step 6/6"),
    (21.0, "stdout", "[3/3] evaluate"),
    (25.0, "stdout", ""),
    (25.0, "stdout", "testbed          7.0 s   reused 0/1   /x/testbed"),
    (25.0, "stdout", "  base-v1: loss=1"),
    (25.0, "stdout", "train           12.0 s   reused 0/1   /x/train/a/much/longer/path"),
    (25.0, "stdout", ""),
    (25.0, "stdout", "model   reverse   a wide accuracy table that is not the summary"),
)


def test_progress_lines_are_the_stdout_lines_inside_the_train_stage():
    assert [name for _, name in headers(RUN)] == STAGES
    assert progress_lines(RUN) == 2  # the stderr line between them is not graftline's progress


def test_silences_count_every_stream_start_and_exit_overall_and_per_stage():
    longest, by_stage, where = silences(RUN)
    assert longest == 8.0 and "(RayTrainWorker) noise" in where
    assert by_stage == {"start": 1.0, "testbed": 6.5, "train": 8.0, "evaluate": 5.0}


def test_summary_width_is_the_widest_line_of_the_summary_table_only():
    width, table = summary_width(RUN, "testbed")
    assert table[0].startswith("testbed") and len(table) == 3
    assert width == len("train           12.0 s   reused 0/1   /x/train/a/much/longer/path")
