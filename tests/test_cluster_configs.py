"""Every shipped cluster definition parses and passes the checks its tool would make, offline."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest
import ray
import yaml

from pipelines.spec import TrainSpec, load_job
from pipelines.training.deepspeed_config import build_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHER = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
DEEPSPEED = sorted((CLUSTER / "deepspeed").glob("*.json"))


def load(path: Path):
    return yaml.safe_load(path.read_text())


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml")) + sorted(CLUSTER.rglob("*.yml"))
    assert len(files) >= 5
    for f in files:
        assert isinstance(load(f), dict), f


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_validates(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = prepare_config(load(path))
    validate_config(cfg)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["max_workers"] == 0 and head["resources"].get("GPU", 0) == 0
    gpu_types = {n: t for n, t in types.items() if t["resources"].get("GPU")}
    assert gpu_types and all(t["resources"]["GPU"] == 8 and t["min_workers"] <= t["max_workers"] for t in gpu_types.values())
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in " ".join(cfg["worker_start_ray_commands"])
    setup = " ".join(cfg["setup_commands"])
    assert f"ray[default,train,tune]=={ray.__version__}" in setup  # the submitting client's version
    assert "torch==" in " ".join(cfg["worker_setup_commands"]) and "/whl/cu" in " ".join(cfg["worker_setup_commands"])
    assert "~/graftline" in cfg["file_mounts"] and "**/.venv" in cfg["rsync_exclude"]


def _containers(pod_spec_holder: dict) -> list[dict]:
    return pod_spec_holder["template"]["spec"]["containers"]


def _check_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"] == {"mode": "token"}
    assert spec.get("rayVersion") == ray.__version__
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    assert groups
    for c in _containers(head) + [c for g in groups for c in _containers(g)]:
        image = c["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"image not pinned by tag: {image}"
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        limits = _containers(g)[0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_kuberay_raycluster():
    doc = load(CLUSTER / "kuberay" / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster" and doc["metadata"]["name"]
    _check_cluster_spec(doc["spec"])


def test_kuberay_rayjob():
    doc = load(CLUSTER / "kuberay" / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob" and doc["metadata"]["name"]
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_cluster_spec(spec["rayClusterSpec"])
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"].endswith(".zip") and all("==" in p for p in env["pip"]["packages"])
    assert env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http")
    cmd = shlex.split(spec["entrypoint"])
    assert cmd[:4] == ["python", "-m", "pipelines.cli", "run"] and cmd[-2:] == ["--address", "auto"]
    cwd = os.getcwd()
    os.chdir(REPO)  # the job file and the DeepSpeed file it names are relative to the working_dir (repo root)
    try:
        job = load_job(cmd[4])
    finally:
        os.chdir(cwd)
    assert job.compute.accelerator == "cuda" and job.output_dir.is_absolute()


def test_cluster_jobs_validate(monkeypatch):
    monkeypatch.chdir(REPO)
    jobs = sorted((CLUSTER / "jobs").glob("*.yaml"))
    assert jobs
    for j in jobs:
        spec = load_job(j.relative_to(REPO))
        assert spec.train.deepspeed, f"{j.name}: expected a DeepSpeed file"


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_deepspeed_file_merges_into_generated_config(path, monkeypatch):
    from deepspeed.runtime.config import DeepSpeedConfig

    monkeypatch.chdir(REPO)
    tr = TrainSpec(deepspeed=str(path.relative_to(REPO)))  # the way a job spec names it
    assert tr.deepspeed == load(path)
    cfg = build_deepspeed_config(micro_batch_size=4, lr=1e-4, steps=100, warmup_steps=10, zero_stage=tr.zero_stage,
                                 grad_clip=1.0, bf16=tr.bf16, offload_optimizer=tr.offload_optimizer, overrides=tr.deepspeed)
    # the file sets the engine's precision and partitioning; batch size and schedule stay graftline's
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["scheduler"]["params"]["total_num_steps"] == 100
    assert cfg["optimizer"]["type"] == "AdamW" and cfg["optimizer"]["params"]["lr"] == 1e-4
    parsed = DeepSpeedConfig(cfg)  # DeepSpeed's own parser; world size 1 without a process group
    assert parsed.bfloat16_config.enabled
    stage = int(path.name.split("-")[0].removeprefix("zero"))
    assert parsed.zero_optimization_stage == stage
    offload = "offload" in path.name
    assert (parsed.zero_config.offload_optimizer is not None) == offload
    if offload:  # ZeRO-Offload needs DeepSpeed's CPU Adam, not torch's
        assert cfg["optimizer"]["params"]["torch_adam"] is False


def test_deepspeed_file_errors_name_the_key(tmp_path):
    from pipelines.spec import SpecError

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "x", "skills": [{"name": "reverse"}], "train": {"deepspeed": "nope.json"}}))
    with pytest.raises(SpecError) as e:
        load_job(job)
    assert e.value.lines == [f"{job}: train.deepspeed: cannot read DeepSpeed config file 'nope.json' (No such file or directory)"]
    (tmp_path / "list.yaml").write_text("[1, 2]")
    job.write_text(yaml.safe_dump({"name": "x", "skills": [{"name": "reverse"}], "train": {"deepspeed": str(tmp_path / "list.yaml")}}))
    with pytest.raises(SpecError, match=r"train\.deepspeed: DeepSpeed config file .* must hold a mapping"):
        load_job(job)
