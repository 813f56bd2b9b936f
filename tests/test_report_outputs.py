"""What a person reads from a report: the chart labels every bar with its value (a zero included) and keeps its legend
beside the bars; the matrix goes to MLflow as a table with one row per model."""

import json

from mlflow import MlflowClient

from pipelines.report import accuracy_chart, table_rows
from pipelines.tracking import Tracker

TABLE = {"base": {"add": 0.0, "general": 1.0}, "grafted": {"add": 0.105, "general": 0.9}}


def test_the_chart_labels_every_bar_and_keeps_the_legend_off_the_bars(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read it back
    accuracy_chart(TABLE, tmp_path / "eval.png", "t")
    (fig,) = figures
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.00", "0.10", "0.90", "1.00"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["add", "general"]
    legend = ax.get_legend().get_window_extent(fig.canvas.get_renderer())
    assert legend.x0 >= ax.get_window_extent(fig.canvas.get_renderer()).x1  # right of the plotting area
    assert min(p.get_height() for p in ax.patches) > 0  # a zero still shows as a bar
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_the_matrix_is_an_mlflow_table_one_row_per_model(tmp_path):
    rows = table_rows(TABLE, {"grafted": 10.0})
    assert rows == [{"model": "base", "add": 0.0, "general": 1.0, "general_drop_points": 0.0},
                    {"model": "grafted", "add": 0.105, "general": 0.9, "general_drop_points": 10.0}]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "t", artifact_root=tmp_path / "art")
    with tracker.run("r") as run:
        run.table(rows, "eval_table.json")
    client = MlflowClient(uri)
    (only,) = client.search_runs([tracker.experiment_id])
    assert [a.path for a in client.list_artifacts(only.info.run_id)] == ["eval_table.json"]
    assert {"path": "eval_table.json", "type": "table"} in json.loads(only.data.tags["mlflow.loggedArtifacts"])  # the UI finds it
