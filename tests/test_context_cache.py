"""Stage outputs: content-keyed reuse, --force, and nothing half-written, without Ray."""

import pytest
import yaml

from pipelines.context import Item, RunContext, StageResult
from pipelines.spec import parse_job
from pipelines.tracking import Tracker


def context(tmp_path, force=frozenset()):
    spec = parse_job(yaml.safe_load("name: t\nskills: [{name: reverse}]"), "job.yaml")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "t", tmp_path / "art")
    parent_cm = tracker.run("t")
    parent = parent_cm.__enter__()
    return RunContext(spec, tmp_path / "job.yaml", tmp_path / "root", tracker, parent, frozenset(force), log=lambda m: None)


def test_same_key_is_reused_and_force_rebuilds(tmp_path):
    calls = []

    def build(tmp, run):
        calls.append(tmp)
        (tmp / "out.txt").write_text(str(len(calls)))
        return {"value": 1.0}

    for force, expected_calls in ((frozenset(), 1), (frozenset(), 1), (frozenset({"train"}), 2), (frozenset({"all"}), 3)):
        ctx = context(tmp_path, force)
        result = StageResult("train")
        path = ctx.run_item("train", "reverse", "k1", {}, build, result)
        assert len(calls) == expected_calls
        assert (path / "out.txt").read_text() == str(expected_calls)
        assert result.metrics["reverse.value"] == 1.0
    other = context(tmp_path).run_item("train", "reverse", "k2", {}, build, StageResult("train"))
    assert other != path and len(calls) == 4


def test_failed_build_leaves_no_output_and_fails_the_run(tmp_path):
    ctx = context(tmp_path)

    def build(tmp, run):
        (tmp / "half.safetensors").write_text("x")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        ctx.run_item("train", "reverse", "k1", {}, build, StageResult("train"))
    assert not (tmp_path / "root" / "train").exists() or not any((tmp_path / "root" / "train").iterdir())
    runs = ctx.tracker.client.search_runs([ctx.tracker.experiment_id], filter_string="tags.`graftline.stage` = 'train'")
    assert [r.info.status for r in runs] == ["FAILED"]


def test_run_items_builds_only_missing_items_together(tmp_path):
    ctx = context(tmp_path)
    seen = []

    def build(todo):
        seen.append(sorted(todo))
        for name, (tmp, _run) in todo.items():
            (tmp / "m").write_text(name)
        return {name: {"loss": 0.5} for name in todo}

    items = [Item("a", "1", {}), Item("b", "2", {})]
    ctx.run_items("testbed", items, build, StageResult("testbed"))
    paths = ctx.run_items("testbed", [*items, Item("c", "3", {})], build, StageResult("testbed"))
    assert seen == [["a", "b"], ["c"]]
    assert (paths["c"] / "m").read_text() == "c"


def test_a_folder_graftline_did_not_write_is_neither_reused_nor_replaced(tmp_path):
    from graft.atomic import OutputError

    squatter = tmp_path / "root" / "train" / "reverse-k1"
    squatter.mkdir(parents=True)
    (squatter / "mine.txt").write_text("keep")
    for force in (frozenset(), frozenset({"train"})):
        ctx = context(tmp_path, force)
        with pytest.raises(OutputError, match="reverse-k1: (exists but is not a complete output|exists and was not written)"):
            ctx.run_item("train", "reverse", "k1", {}, lambda tmp, run: {}, StageResult("train"))
        assert sorted(p.name for p in squatter.iterdir()) == ["mine.txt"]
