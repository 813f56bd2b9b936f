"""The whole pipeline on a real local Ray with real DeepSpeed and MLflow, at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow.pyfunc
import pytest
import yaml
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from graft.lora import read_lora_deltas
from pipelines.logged_model import local_artifact_folder

pytestmark = pytest.mark.integration

STAGE_RUNS = {"testbed/data-general-s0", "testbed/data-reverse-s0", "testbed/data-sort-s0", "testbed/base-v1", "train/reverse",
              "train/sort", "score/reverse", "score/sort", "pack/reverse", "pack/sort", "graft/grafted", "evaluate/report"}


def job(tmp: Path, graft: dict | None = None, **train) -> dict:
    return {
        "name": "itest",
        "output_dir": str(tmp / "runs"),
        "tracking": {"experiment": "itest", "system_metrics_every_s": 0.5},
        "testbed": {"size": "tiny", "pretrain_steps": 30, "pretrain_examples": 1000, "train_examples": 200, "eval_examples": 16},
        "skills": [{"name": "reverse"}, {"name": "sort"}],
        # ZeRO-3 with every parameter partitioned: each LoRA must be gathered before it is saved, or its tensors are
        # written empty (the testbed's own training keeps its ZeRO-2)
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "zero_stage": 3,
                  "deepspeed": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}, **train},
        "score": {"examples": 8, "shards": 2},
        "pack": {"budget": 0.2, "bits": [3], "band_fractions": [1.0], "quantizer": "gptq", "allocation": "energy_importance",
                 "calibration_examples": 16, "tune_steps": 2},
        "evaluate": {"max_new_tokens": 8},
        "graft": graft or {},
    }


def graft_run(tmp: Path, spec: dict, *extra: str) -> subprocess.CompletedProcess:
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(path), *extra],
                          capture_output=True, text=True, timeout=900)


def runs_of(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("itest")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=500)
    return client, runs


def children(runs, parent):
    """A job's child runs by `stage/item`, their names with the stage's place in the recipe taken off (`02 train/sort`)."""
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return {r.info.run_name.split(" ", 1)[1]: r for r in kids}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    proc = graft_run(tmp, job(tmp))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_end_to_end_outputs_and_tracking(first_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, proc = first_run
    client, runs = runs_of(tmp)
    (parent,) = [r for r in runs if r.info.run_name == "itest"]
    assert parent.info.status == "FINISHED"
    assert client.get_experiment_by_name("itest").tags["mlflow.experimentKind"] == "finetuning"  # the UI opens on training runs
    assert parent.data.tags["mlflow.note.content"].startswith("graftline job `itest` from ")
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40 and parent.data.tags["mlflow.user"]
    kids = children(runs, parent)
    assert set(kids) == STAGE_RUNS
    assert all(r.info.status == "FINISHED" and r.data.tags["graftline.cached"] == "false" for r in kids.values())
    # sorted by name (as the UI can sort them), the runs read in the recipe's order
    by_name = [kids[n].data.tags["graftline.stage"] for n in sorted(kids, key=lambda n: kids[n].info.run_name)]
    assert list(dict.fromkeys(by_name)) == parent.data.tags["graftline.stages"].split(",")

    # training really went through DeepSpeed, at the ZeRO stage the spec asked for
    for skill in ("reverse", "sort"):
        train = kids[f"train/{skill}"]
        assert train.data.params["deepspeed.engine_class"] == "DeepSpeedEngine"
        assert train.data.params["deepspeed.zero_stage"] == "3"
        assert train.data.params["deepspeed.world_size"] == "2"
        assert len(client.get_metric_history(train.info.run_id, "train_loss")) == 6
        assert "adapter/adapter_model.safetensors" in {a.path for a in client.list_artifacts(train.info.run_id, "adapter")}
        trained = Path(train.data.tags["graftline.output"])
        info = json.loads((trained / "train_info.json").read_text())
        assert info["sharded_load"] and info["loaded_share"] < 0.75  # ZeRO-3 loaded only each rank's shard of the base
        scored = load_file(str(Path(kids[f"score/{skill}"].data.tags["graftline.output"]) / "scores.safetensors"))
        assert set(scored) == set(read_lora_deltas(trained))  # what the SkillPack can touch, not the whole model
        assert "skillpack/skillpack.json" in {a.path for a in client.list_artifacts(kids[f"pack/{skill}"].info.run_id, "skillpack")}
        assert kids[f"score/{skill}"].data.metrics["terms"] == 8
        manifest = json.loads((Path(kids[f"pack/{skill}"].data.tags["graftline.output"]) / "skillpack.json").read_text())
        assert manifest["total_bytes"] <= 0.2 * manifest["delta_bf16_bytes"] and manifest["settings"]["calibrated"]
        assert {e["quantizer"] for e in manifest["tensors"].values()} == {"gptq"}  # calibrated on the skill's data
        assert manifest["grid_tuning"]["steps"] == 2 and "grid_kl_after" in kids[f"pack/{skill}"].data.metrics
    assert "acc.grafted.reverse" in kids["evaluate/report"].data.metrics
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/eval.json", "report/eval.png", "report/eval.txt"} <= report
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "job")] == ["job/job.yaml"]
    assert parent.data.params["train.zero_stage"] == "3"
    for skill in ("reverse", "sort"):
        adapter = Path(kids[f"train/{skill}"].data.tags["graftline.output"]) / "adapter_model.safetensors"
        shapes = [tuple(t.shape) for t in load_file(adapter).values()]
        assert shapes and all(len(s) == 2 and min(s) > 0 for s in shapes)  # whole LoRA matrices, not empty shards

    grafted = Path(parent.data.tags["graftline.grafted_checkpoint"])
    # the grafted checkpoint is version 1 of the registered model `itest-grafted`, from a logged model of the graft run
    graft_kid = kids["graft/grafted"]
    assert parent.data.tags["graftline.registered_model"] == graft_kid.data.tags["graftline.registered_model"] == "itest-grafted/1"
    (version,) = client.search_model_versions("name = 'itest-grafted'")
    assert version.run_id == graft_kid.info.run_id and version.tags["graftline.key"] == graft_kid.data.tags["graftline.key"]
    logged = client.get_logged_model(parent.data.tags["graftline.logged_model_id"])
    assert logged.status == LoggedModelStatus.READY and logged.source_run_id == graft_kid.info.run_id
    assert version.source == logged.artifact_location and logged.tags["graftline.weights"] == "hard-linked"
    model_dir = local_artifact_folder(logged.artifact_location)
    assert model_dir.is_relative_to(tmp / "runs" / "mlartifacts")
    assert os.path.samefile(model_dir / "model" / "model.safetensors", grafted / "model.safetensors")  # a hard link, no copy
    assert len(mlflow.pyfunc.load_model(logged.artifact_location).predict(["rev:abc="], params={"max_new_tokens": 4})) == 1
    assert "  graft: registered itest-grafted version 1 (models:/itest-grafted/1)" in proc.stdout
    # MLflow's system metrics of the training node, sampled while the base trained
    base_run = kids["testbed/base-v1"]
    assert client.get_metric_history(base_run.info.run_id, "system/cpu_utilization_percentage")
    assert client.get_metric_history(base_run.info.run_id, "system/system_memory_usage_megabytes")
    model = AutoModelForCausalLM.from_pretrained(str(grafted))
    tok = AutoTokenizer.from_pretrained(str(grafted))
    out = model.generate(**tok(["rev:abc="], return_tensors="pt"), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, len("rev:abc=") + 4)
    assert "model" in proc.stdout and "grafted" in proc.stdout  # the eval table was printed
    for noise in ("Writing model shards", "Loading weights", "Setting accelerator to CPU", "Token authentication is enabled",
                  "Creating initial MLflow database tables"):  # other libraries' chatter, shown only with -v
        assert noise not in proc.stdout + proc.stderr, noise
    # live progress, from rank 0 through the driver: the worker group starting, then every training's last step
    assert proc.stdout.count("starting 2 training workers (Ray Train, DeepSpeed)") == 2  # the testbed's, the experts'
    assert "testbed/base-v1: step 30/30  loss " in proc.stdout
    assert "train/reverse (job 1/2): step 6/6  loss " in proc.stdout and "train/sort (job 2/2): step 6/6  loss " in proc.stdout
    assert not list((tmp / "runs").rglob(".tmp-*"))


def test_second_run_retrains_to_the_same_losses_and_reuses_every_other_stage(first_run):
    """Rerun with `--force train`: a fresh Ray Train run (2 workers, ZeRO-3, gloo) gives every expert the same loss at
    every step, so a result measured on a seed is the code's, not the run's; every other stage is reused, its inputs'
    keys unchanged."""
    tmp, _ = first_run
    experts = sorted((tmp / "runs" / "itest" / "train").glob("*-*/losses.json"))
    assert [p.parent.name.rsplit("-", 1)[0] for p in experts] == ["reverse", "sort"]
    before = {p: json.loads(p.read_text()) for p in experts}
    assert all(len(losses) == 6 for losses in before.values())
    proc = graft_run(tmp, job(tmp), "--force", "train")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = runs_of(tmp)
    parent = [r for r in runs if r.info.run_name == "itest"][-1]
    kids = children(runs, parent)
    assert set(kids) == STAGE_RUNS
    assert {n for n, r in kids.items() if r.data.tags["graftline.cached"] == "false"} == {"train/reverse", "train/sort"}
    assert proc.stdout.count("reusing") == len(STAGE_RUNS) - 2
    assert "  graft: already registered as itest-grafted version 1 (models:/itest-grafted/1)" in proc.stdout
    assert parent.data.tags["graftline.registered_model"] == "itest-grafted/1"
    assert {p: json.loads(p.read_text()) for p in experts} == before


def test_failed_stage_is_failed_in_mlflow_and_writes_nothing(first_run):
    tmp, _ = first_run
    spec = job(tmp, lora={"target_modules": ["no_such_proj"]})
    proc = graft_run(tmp, spec)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("graft: error: ")
    _, runs = runs_of(tmp)
    parent = [r for r in runs if r.info.run_name == "itest"][-1]
    assert parent.info.status == "FAILED"
    kids = children(runs, parent)
    assert kids["train/reverse"].info.status == "FAILED"
    assert "no_such_proj" in kids["train/reverse"].data.tags["graftline.error"]
    key = kids["train/reverse"].data.tags["graftline.key"]
    assert not (tmp / "runs" / "itest" / "train" / f"reverse-{key}").exists()
    assert not list((tmp / "runs").rglob(".tmp-*"))


def test_routed_graft_reruns_only_graft_and_evaluate(first_run):
    """The routed graft, evaluated by graftline and by lm-eval (the testbed's held-out `reverse` rows as an lm-eval task):
    every model, the routed one routing, gets the same exact match from both to within one example."""
    from graft.harness import write_skill_task
    from graft.testbed.skills import generate

    tmp, _ = first_run
    spec = job(tmp, graft={"method": "routed", "router_examples": 50})
    task = write_skill_task("reverse", generate("reverse", "test", 16, 0), tmp / "tasks", max_new_tokens=8)
    spec["evaluate"]["harness"] = [str(task)]
    proc = graft_run(tmp, spec)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = runs_of(tmp)
    parent = [r for r in runs if r.info.run_name == "itest"][-1]
    kids = children(runs, parent)
    fresh = {name for name, r in kids.items() if r.data.tags["graftline.cached"] == "false"}
    assert fresh == {"graft/grafted", "evaluate/report"}
    out = Path(kids["graft/grafted"].data.tags["graftline.output"])
    assert (out / "routed.json").is_file() and not list(out.glob("model*.safetensors"))  # packs stay packed, no dense checkpoint
    assert kids["evaluate/report"].info.status == "FINISHED" and "acc.grafted.general" in parent.data.metrics
    report = Path(kids["evaluate/report"].data.tags["graftline.output"])
    ours, theirs = json.loads((report / "eval.json").read_text()), json.loads((report / "harness.json").read_text())
    assert set(theirs) == set(ours) == {"base", "expert-reverse", "expert-sort", "grafted"}
    for model in ours:
        assert abs(theirs[model]["graftline_reverse"]["exact_match"] - ours[model]["reverse"]) * 16 <= 1, model
        assert parent.data.metrics[f"harness.{model}.graftline_reverse.exact_match"] == theirs[model]["graftline_reverse"]["exact_match"]
        assert json.loads((report / "lm_eval" / f"{model}.0.json").read_text())["results"]["graftline_reverse"]["sample_len"] == 16
    client = MlflowClient(f"sqlite:///{tmp / 'runs' / 'mlflow.db'}")
    for run_id in (parent.info.run_id, kids["evaluate/report"].info.run_id):  # the UI's grids: skills, and lm-eval's tasks
        assert {"eval_table.json", "harness_table.json"} <= {a.path for a in client.list_artifacts(run_id)}
    general = json.loads((report / "general.json").read_text())
    assert general["source"] == "testbed skill 'general'" and set(general["drop_points"]) == set(ours) - {"base"}
    assert ("graftline.warning" in parent.data.tags) == bool(general["over"])
