"""The end-of-run summary fits 100 columns and shows every item of every stage, each with its first metrics."""

from pathlib import Path

from pipelines.context import StageResult
from pipelines.driver import SUMMARY_WIDTH, summary_table


def test_every_item_is_shown_within_the_width_however_long_its_folder_and_metrics():
    deep = Path("/tmp/" + "d" * 120 + "/runs/demo/train")
    skills = ("reverse", "sort", "add", "vocab")
    results = {
        "train": StageResult("train", outputs={s: deep / f"{s}-k" for s in skills}, seconds=261.04, cached=1,
                             metrics={f"{s}.{m}": 0.5 for s in skills for m in ("final_loss", "train_seconds", "steps_per_second",
                                                                              "peak_rss_mb", "trainable_parameters", "restarts")}),
        "evaluate": StageResult("evaluate", outputs={"report": Path("/r/evaluate/report-1")}, metrics={"grafted.add": 0.1}),
    }
    lines = summary_table(results).splitlines()
    assert max(map(len, lines)) <= SUMMARY_WIDTH
    assert lines[0].startswith("train") and "261.0 s" in lines[0] and "reused 1/4" in lines[0] and lines[0].endswith("runs/demo/train")
    for skill in skills:  # every item, its loss first (the old table stopped after four metrics in all)
        assert any(line.startswith(f"  {skill}: final_loss=0.5") for line in lines)
    assert "restarts" not in "\n".join(lines)  # five metrics an item
    assert "  grafted: add=0.1" in lines and "  report" in lines
