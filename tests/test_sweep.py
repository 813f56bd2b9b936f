"""`graft sweep`: the sweep section's validation, params on a job copy, rungs, best.yaml; one tiny real sweep."""

from __future__ import annotations

import csv
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.spec import SEARCH_SPACES, SpecError, SweepSpec, load_job, parse_job
from pipelines.sweep import SCHEDULERS, TUNE_SPACES, apply_params, default_concurrency, rungs_of
from pipelines.sweep_metrics import metric_value
from pipelines.sweep_report import TrialRow, best_row, plot_results, results_table, write_best_yaml
from tests.conftest import run_cli

BASE = {"name": "t", "skills": [{"name": "reverse"}, {"name": "sort"}, {"name": "add"}]}
SWEEP = {"params": {"train.lora.rank": {"grid": [4, 8]}, "pack.energy": {"choice": [0.9, 0.99]}}}


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def lines_for(tmp_path: Path, sweep: dict) -> list[str]:
    path = write(tmp_path, {**BASE, "sweep": sweep})
    with pytest.raises(SpecError) as e:
        load_job(path)
    return [line.removeprefix(f"{path}: ") for line in e.value.lines]


def test_valid_sweep_section_and_defaults(tmp_path):
    spec = load_job(write(tmp_path, {**BASE, "sweep": SWEEP}))
    assert spec.sweep.metric == "mean_grafted" and spec.sweep.mode == "max" and spec.sweep.scheduler == "asha"
    assert spec.sweep.max_concurrent is None and load_job(write(tmp_path, BASE)).sweep is None


@pytest.mark.parametrize(("params", "line"), [
    ({"train.lora.rnak": {"choice": [4]}}, "sweep.params.train.lora.rnak: no such job field"),
    ({"trian.lr": {"choice": [1e-3]}}, "sweep.params.trian.lr: no such job field"),
    ({"train.lr.x": {"choice": [1e-3]}}, "sweep.params.train.lr.x: no such job field"),
    ({"train.lora.rank": {"choice": [4, "eight"]}}, ("sweep.params.train.lora.rank: choice value 'eight': train.lora.rank: "
                                                    "expected int, got 'eight'")),
    ({"train.zero_stage": {"grid": [2, 4]}}, ("sweep.params.train.zero_stage: grid value 4: train.zero_stage: "
                                            "expected 0, 1, 2 or 3, got 4")),
    ({"train.lora.rank": {"uniform": [4, 16]}}, "sweep.params.train.lora.rank: uniform needs a float field; use choice or grid"),
    ({"train.lr": {"loguniform": [0, 1]}}, "sweep.params.train.lr: loguniform: expected [low, high] with 0 < low < high, got [0, 1]"),
    ({"train.lr": {"uniform": [2, 1]}}, "sweep.params.train.lr: uniform: expected [low, high] with low < high, got [2, 1]"),
    ({"train.lr": {"grid": []}}, "sweep.params.train.lr: grid: expected a non-empty list of values"),
    ({"train.lr": {"range": [1, 2]}}, ("sweep.params.train.lr: expected one search space of: choice, grid, uniform, loguniform; "
                                      "got keys ['range']")),
    ({"pack.bits": {"choice": [[8, 4], [8]]}}, ("sweep.params.pack.bits: choice value [8]: pack: 'bits' and 'band_fractions' "
                                               "need the same length")),
])
def test_bad_params_name_file_and_key(tmp_path, params, line):
    assert lines_for(tmp_path, {"params": params}) == [line]


def test_unsweepable_sections_and_metrics(tmp_path):
    (line,) = lines_for(tmp_path, {"params": {"testbed.pretrain_steps": {"choice": [10]}}})
    assert line.startswith("sweep.params.testbed.pretrain_steps: cannot be swept") and "train, score, pack" in line
    (line,) = lines_for(tmp_path, {**SWEEP, "metric": "mean_graft"})
    assert line.startswith("sweep.metric: unknown sweep metric 'mean_graft'") and "mean_grafted" in line
    assert lines_for(tmp_path, {**SWEEP, "metric": "acc.grafted.copy"}) == [
        "sweep.metric: metric 'acc.grafted.copy': 'copy' is not evaluated by this job (skills: reverse, sort, add, general)"]
    assert lines_for(tmp_path, {**SWEEP, "metric": "acc.expert-general.sort"})[0].startswith(
        "sweep.metric: metric 'acc.expert-general.sort': no model 'expert-general'")
    assert lines_for(tmp_path, {**SWEEP, "mode": "maximise"}) == ["sweep.mode: expected 'max' or 'min', got 'maximise'"]
    assert lines_for(tmp_path, {"params": {}})[0].startswith("sweep.params: ")


def test_registries_cover_the_spec_names():
    assert set(TUNE_SPACES) == set(SEARCH_SPACES)
    assert set(SCHEDULERS) == set(typing.get_args(SweepSpec.model_fields["scheduler"].annotation))


def test_apply_params_on_a_copy_revalidates(tmp_path):
    spec = load_job(write(tmp_path, {**BASE, "sweep": SWEEP}))
    job = spec.model_dump(mode="json", exclude={"sweep"})
    trial = apply_params(job, {"train.lora.rank": 4, "pack.energy": 0.9, "train.deepspeed.zero_optimization.stage": 3}, "job.yaml")
    assert trial.train.lora.rank == 4 and trial.pack.energy == 0.9 and trial.train.deepspeed == {"zero_optimization": {"stage": 3}}
    assert trial.sweep is None and trial.train.lora.alpha == spec.train.lora.alpha
    assert spec.train.lora.rank == 8 and job["train"]["lora"]["rank"] == 8  # the original is untouched
    with pytest.raises(SpecError) as e:
        apply_params(job, {"pack.energy": 2.0}, "job.yaml")
    assert e.value.lines == ["job.yaml: pack.energy: Input should be less than or equal to 1"]


def test_rungs_put_the_metric_skills_first_in_job_order(tmp_path):
    def rungs(**sweep):
        return rungs_of(parse_job({**BASE, "sweep": {**SWEEP, **sweep}}, "x"))

    assert rungs() == [["reverse"], ["reverse", "sort"], ["reverse", "sort", "add"]]
    assert rungs(metric="acc.grafted.add") == [["add"], ["reverse", "add"], ["reverse", "sort", "add"]]
    assert rungs(metric="acc.expert-sort.add") == [["sort", "add"], ["reverse", "sort", "add"]]
    assert rungs(metric="acc.grafted.general") == [["reverse"], ["reverse", "sort"], ["reverse", "sort", "add"]]
    assert rungs(scheduler="none") == [["reverse", "sort", "add"]]


def test_metric_values_and_concurrency():
    table = {"grafted": {"a": 0.5, "b": 0.25}, "expert-a": {"a": 1.0, "b": 0.0}, "expert-b": {"a": 0.0, "b": 0.5}}
    assert metric_value("mean_grafted", table, ["a", "b"]) == 0.375
    assert metric_value("min_grafted", table, ["a", "b"]) == 0.25
    assert metric_value("graft_retention", table, ["a", "b"]) == 0.375 / 0.75
    assert metric_value("acc.expert-b.b", table, ["a", "b"]) == 0.5
    spec = parse_job({**BASE, "train": {"num_workers": 2, "cpus_per_worker": 2}}, "x")
    assert [default_concurrency(spec, c) for c in (2, 4, 9, 16)] == [1, 1, 2, 4]


def rows() -> list[TrialRow]:
    return [TrialRow("t1", {"train.lora.rank": 4, "pack.bits": [8, 4]}, 0.5, 3, 3, "done", "r1"),
            TrialRow("t2", {"train.lora.rank": 8, "pack.bits": [4, 4]}, 0.9, 1, 3, "stopped at rung 1", "r2"),
            TrialRow("t3", {"train.lora.rank": 16, "pack.bits": [8, 4]}, 0.7, 3, 3, "done", "r3"),
            TrialRow("t4", {"train.lora.rank": 32, "pack.bits": [8, 4]}, None, 0, 3, "error", "", "ValueError: boom")]


def test_best_row_only_among_finished_trials():
    assert best_row(rows(), "max").trial == "t3"
    assert best_row(rows(), "min").trial == "t1"
    assert best_row(rows()[1:2], "max") is None


def test_best_yaml_is_the_job_with_best_params_and_validates(tmp_path):
    raw = {**BASE, "train": {"steps": 5}, "sweep": SWEEP}
    path = write_best_yaml(raw, rows()[2], "mean_grafted", tmp_path / "best.yaml")
    text = path.read_text()
    assert text.startswith("# Best trial of a graftline sweep: mean_grafted = 0.7000 (trial t3")
    data = yaml.safe_load(text)
    assert "sweep" not in data and data["train"] == {"steps": 5, "lora": {"rank": 16}} and data["pack"] == {"bits": [8, 4]}
    spec = load_job(path)
    assert spec.train.lora.rank == 16 and spec.train.steps == 5
    with pytest.raises(SpecError):
        write_best_yaml(raw, TrialRow("t", {"train.lora.rank": 0}, 1.0, 1, 1, "done"), "m", tmp_path / "bad.yaml")


def test_results_table_and_plot(tmp_path):
    headers, body = results_table(rows(), "mean_grafted")
    assert headers == ["trial", "train.lora.rank", "pack.bits", "mean_grafted", "rungs", "status", "mlflow_run"]
    assert body[1][3:6] == ["0.9000", "1/3", "stopped at rung 1"] and body[3][3] == "" and "boom" in body[3][5]
    png = plot_results(rows(), "mean_grafted", rows()[2], tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_bad_sweep_spec_exits_2_and_runs_nothing(tmp_path):
    path = write(tmp_path, {**BASE, "output_dir": str(tmp_path / "runs"), "sweep": {"params": {"train.lora.rnak": {"grid": [4]}}}})
    proc = run_cli("sweep", path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{path}: sweep.params.train.lora.rnak: no such job field"
    path = write(tmp_path, {**BASE, "output_dir": str(tmp_path / "runs")})
    proc = run_cli("sweep", path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(f"{path}: sweep: missing")
    assert not (tmp_path / "runs").exists()


@pytest.mark.integration
@pytest.mark.slow  # 4-5 min on 2 cores (five Ray Train runs under Tune): `make test-all`
def test_tiny_sweep_end_to_end(tmp_path):
    """2 trials (pack.energy 0.9 / 0.99), ASHA rungs over 2 skills, one at a time: the second reuses the adapters."""
    spec = {
        "name": "stest", "output_dir": str(tmp_path / "runs"), "tracking": {"experiment": "stest"},
        "testbed": {"size": "tiny", "pretrain_steps": 30, "pretrain_examples": 1000, "train_examples": 200, "eval_examples": 16},
        "skills": [{"name": "reverse"}, {"name": "sort"}],
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2},
        "score": {"examples": 8, "shards": 2},
        "evaluate": {"max_new_tokens": 8},
        "sweep": {"metric": "mean_grafted", "max_concurrent": 1, "params": {"pack.energy": {"grid": [0.9, 0.99]}}},
    }
    path = write(tmp_path, spec)
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "sweep", str(path)], check=False, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("stest")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    (sweep,) = [r for r in runs if r.data.tags.get("graftline.sweep") == "parent"]
    assert sweep.info.status == "FINISHED"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id and "graftline.sweep_trial" in r.data.tags]
    assert sorted(float(t.data.params["pack.energy"]) for t in trials) == [0.9, 0.99]
    assert all("mean_grafted" in t.data.metrics and t.info.status == "FINISHED" for t in trials)
    testbed_kids = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == sweep.info.run_id} - {
        t.info.run_name for t in trials}
    assert "testbed/base-v1" in testbed_kids  # built once, under the sweep run
    # trials share the content-keyed cache: each adapter is trained once across the whole sweep
    trained = [r for r in runs if r.data.tags.get("graftline.stage") == "train" and r.data.tags.get("graftline.cached") == "false"]
    assert sorted(r.data.tags["graftline.item"] for r in trained) == ["reverse", "sort"]

    arts = {a.path for a in client.list_artifacts(sweep.info.run_id, "sweep")}
    assert {"sweep/results.csv", "sweep/results.png", "sweep/best.yaml"} <= arts
    out = tmp_path / "runs" / "stest" / "sweep"
    best = load_job(out / "best.yaml")
    assert best.sweep is None and best.pack.energy in (0.9, 0.99)
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and {r["pack.energy"] for r in table} == {"0.9", "0.99"}
    assert "mean_grafted" in proc.stdout and "best: mean_grafted" in proc.stdout
