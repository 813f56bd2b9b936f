"""A tiny job's runs as a user sees them in the MLflow UI, in headless Chromium: the runs table in pipeline order, a
train run's loss chart drawn, the evaluation table as a grid of models × skills.

One 2-skill job (the integration test's sizes) runs once for the module; `mlflow server` then serves its sqlite
store and local artifacts on a free loopback port. Screenshots go to each test's tmp_path. `make test-ui` installs
what this needs (Debian's chromium, the `ui` extra) and runs it; without them it is skipped, saying which is missing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.tracking import ui_link
from tests import ui_checks

pytestmark = [pytest.mark.browser, pytest.mark.integration]

SKILLS = ("reverse", "sort")
MODELS = ("base", *(f"expert-{s}" for s in SKILLS), "grafted")


def job(tmp: Path) -> dict:
    """The integration test's job: every stage of the `graft` recipe on a tiny testbed, two skills."""
    return {
        "name": "uitest",
        "output_dir": str(tmp / "runs"),
        "tracking": {"experiment": "uitest"},
        "testbed": {"size": "tiny", "pretrain_steps": 30, "pretrain_examples": 1000, "train_examples": 200, "eval_examples": 16},
        "skills": [{"name": s} for s in SKILLS],
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2},
        "score": {"examples": 8, "shards": 2},
        "pack": {"budget": 0.2, "bits": [3], "band_fractions": [1.0], "quantizer": "gptq", "allocation": "energy_importance",
                 "calibration_examples": 16, "tune_steps": 2},
        "evaluate": {"max_new_tokens": 8},
    }


class Job:
    """The finished job as the UI checks need it: where the UI is, the parent run, its children and their stages."""

    def __init__(self, base_url: str, client, experiment_id: str) -> None:
        self.base_url, self.experiment_id = base_url, experiment_id
        self.parent, self.kids = ui_checks.job_runs(client, experiment_id, "uitest")
        self.stages = self.parent.data.tags["graftline.stages"].split(",")
        self.stage_of = {k.info.run_id: k.data.tags["graftline.stage"] for k in self.kids}

    def of_stage(self, stage: str) -> list:
        return [k for k in self.kids if k.data.tags["graftline.stage"] == stage]


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """The finished job, the MLflow server on its store and a browser; skipped, saying why, without playwright or Chromium
    (checked here, not at import, so that a run which deselects these tests reports nothing about them)."""
    missing = ui_checks.missing_browser()
    if missing:
        pytest.skip(missing)
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("ui")
    spec = tmp / "job.yaml"
    spec.write_text(yaml.safe_dump(job(tmp)))
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(spec)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    store = tmp / "runs" / "mlflow.db"
    experiment = MlflowClient(f"sqlite:///{store}").get_experiment_by_name("uitest")
    with ui_checks.mlflow_server(store, tmp / "server") as url, ui_checks.chromium() as browser:
        yield Job(url, MlflowClient(f"sqlite:///{store}"), experiment.experiment_id), browser


def test_the_runs_table_lists_the_job_in_pipeline_order(ui, tmp_path):
    job, browser = ui
    pid, kids = job.parent.info.run_id, list(job.stage_of)
    assert set(job.stage_of.values()) == set(job.stages)

    # the link `graft ui` prints: oldest first, so the UI nests the children under their parent (it does only when
    # sorted by start time); the parent expanded, then its children in the recipe's order
    with ui_checks.fresh_page(browser) as page:
        link = ui_checks.runs_order(page, ui_link(job.base_url, job.experiment_id), pid, kids, tmp_path, "runs_link")
    assert link.ok, link.seen
    assert pid in link.seen["listed"]
    assert ui_checks.in_pipeline_order(link.seen["listed"], job.stage_of, job.stages) == (True, "")
    assert link.seen["nested"] and link.seen["expanded"], link.seen
    listed = link.seen["listed"]
    assert listed.index(pid) + 1 == min(listed.index(k) for k in kids)  # nested right under the parent
    assert ui_checks.in_pipeline_order(listed, job.stage_of, job.stages) == (True, "")

    # the UI's own default (newest first) reads the job backwards: the check sees it
    with ui_checks.fresh_page(browser) as page:
        default = ui_checks.runs_order(page, ui_checks.runs_link(job.base_url, job.experiment_id), pid, kids, tmp_path, "runs_default")
    assert default.ok and default.seen["expanded"], default.seen
    ok, why = ui_checks.in_pipeline_order(default.seen["listed"], job.stage_of, job.stages)
    assert not ok and "listed after" in why


def test_each_train_run_draws_its_loss_chart(ui, tmp_path):
    job, browser = ui
    trains = job.of_stage("train")
    assert len(trains) == len(SKILLS)
    with ui_checks.fresh_page(browser) as page:
        for run in trains:
            chart = ui_checks.loss_chart(page, job.base_url, job.experiment_id, run.info.run_id, shots=tmp_path,
                                         name=f"loss_{run.data.tags['graftline.item']}")
            assert chart.ok and chart.seen["vertices"] >= 2, (run.info.run_name, chart.seen)
            assert chart.shot is not None and chart.shot.path.stat().st_size > 0


def test_the_eval_table_shows_every_model_by_skill(ui, tmp_path):
    job, browser = ui
    (report,) = job.of_stage("evaluate")
    with ui_checks.fresh_page(browser) as page:
        for name, run in (("eval_table_report", report), ("eval_table_parent", job.parent)):
            table = ui_checks.eval_table(page, job.base_url, job.experiment_id, run.info.run_id, MODELS, SKILLS,
                                         shots=tmp_path, name=name)
            assert table.ok, (name, table.seen)
            assert table.seen["columns"][0] == "model" and table.seen["models"] == list(MODELS)
        # the check tells a table that lacks a model
        missing = ui_checks.eval_table(page, job.base_url, job.experiment_id, report.info.run_id, (*MODELS, "expert-add"), SKILLS)
        assert not missing.ok
