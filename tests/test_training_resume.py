"""A training worker SIGKILLed mid-run: Ray Train restarts the group and training resumes from its last checkpoint.

Real Ray (with its dashboard, for the state API), real Ray Train, real DeepSpeed on CPU with gloo, a
tiny Llama. A background thread finds the training workers through `ray.util.state.list_actors` and
kills one once Ray Train has registered a checkpoint of the job it waits for.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from graft.data import write_jsonl
from graft.model_checks import check_adapter, check_checkpoint
from graft.testbed.skills import generate
from pipelines.cache import Ref
from pipelines.training.deepspeed_config import build_deepspeed_config
from pipelines.training.trainer import TrainJob, TrainRequest, run_training
from tests.conftest import free_port, make_base

# The faults benchmark (benchmarks/faults.py) kills a worker the same way on every run of it; here it is kept
# out of the default run for time, and runs with `make test-all`.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Ray Train V2 rewrites this file in the run folder each time it registers a checkpoint (Ray 2.60's layout).
SNAPSHOT = "checkpoint_manager_snapshot.json"


@contextlib.contextmanager
def ray_with_dashboard() -> Iterator[str]:
    """A private local Ray on loopback with its dashboard (the state API's server) on a free port; yields its URL.

    Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default); a
    worker's report waits for the previous one to be collected, so checkpoints every few tiny steps
    would pace the run at one per poll. A shorter poll keeps it short; production keeps Ray's.
    """
    import ray

    port = free_port()
    ctx = ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                   _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
                   runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_V2_ENABLED": "1",
                                             "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}})
    try:
        yield f"http://{ctx.dashboard_url}"
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def dashboard():
    with ray_with_dashboard() as url:
        yield url


def registered_checkpoint(storage: Path) -> dict | None:
    """Metrics of the latest checkpoint Ray Train has registered under `storage`, or None yet."""
    for path in storage.rglob(SNAPSHOT):  # <storage>/<scratch folder>/<run name>/SNAPSHOT
        try:
            latest = json.loads(path.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):  # being rewritten: look again
            return None
        return latest and latest["metrics"]
    return None


def kill_a_worker(dashboard: str, storage: Path, job: int, killed: dict) -> None:
    """Once a checkpoint of `job` is registered, SIGKILL one Ray Train worker process; note its pid and the step."""
    from ray.util.state import list_actors

    deadline = time.time() + 240
    pids: list[int] = []
    while len(pids) < 2 and time.time() < deadline:
        pids = [a.pid for a in list_actors(address=dashboard, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
        time.sleep(0.2)
    while pids and time.time() < deadline:
        metrics = registered_checkpoint(storage)
        if metrics and metrics["job"] == job:
            os.kill(pids[0], signal.SIGKILL)
            killed.update(pid=pids[0], step=metrics["step"])
            return
        time.sleep(0.02)


def tiny_request(tmp: Path, mode: str, steps: int, deepspeed: dict, model: Path) -> TrainRequest:
    data = tmp / "data.jsonl"
    if not data.is_file():
        write_jsonl(data, generate("reverse", "train", 200, 0))
    return TrainRequest(model=Ref(str(model), "base"), tokenizer=Ref(str(model), "base"), data=Ref(str(data), "data"), mode=mode,
                        steps=steps, batch_size=4, seed=0, deepspeed=deepspeed, num_workers=2, accelerator="cpu",
                        adapter={"rank": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]} if mode == "lora" else None)


def train_with_a_kill(tmp: Path, dashboard: str, jobs: list[TrainJob], kill_during: int, every: int) -> dict:
    """Run `jobs` (one retry allowed) while a thread kills a worker during job `kill_during`; returns {pid, step} of the kill."""
    killed: dict = {}
    thread = threading.Thread(target=kill_a_worker, args=(dashboard, tmp / "ray_train", kill_during, killed), daemon=True)
    thread.start()
    run_training(jobs, tmp / "ray_train", "resume", checkpoint_every=every, max_failures=1)
    thread.join(timeout=5)
    return killed


def zero2(steps: int) -> dict:
    return build_deepspeed_config(micro_batch_size=4, lr=1e-3, steps=steps, warmup_steps=2, zero_stage=2, grad_clip=1.0, bf16=False,
                                  offload_optimizer=False)


def kill_one_worker_and_train(root: Path, steps: int = 40, every: int = 10) -> dict:
    """One tiny LoRA training on a fresh private Ray, a worker SIGKILLed after its first registered checkpoint
    (benchmarks/faults.py): what its train_info.json records, with `losses` the number of losses it holds and
    `resumed_from_step` 0 when it never resumed."""
    with ray_with_dashboard() as url:
        base = make_base(root / "base")
        job = TrainJob(tiny_request(root, "lora", steps, zero2(steps), base), str(root / "out"))
        killed = train_with_a_kill(root, url, [job], kill_during=0, every=every)
    info = json.loads((root / "out" / "train_info.json").read_text())
    return {"steps": info["steps"], "losses": len(json.loads((root / "out" / "losses.json").read_text())),
            "resumed_from_step": info["resumed_from_step"] or 0, "restarts": info["restarts"], "zero_stage": info["zero_stage"],
            "killed_pid": killed.get("pid"), "killed_after_checkpoint_step": killed.get("step")}


def test_killed_worker_resumes_the_job_in_progress_from_its_last_checkpoint(tmp_path, dashboard):
    steps, every = 40, 10
    base = make_base(tmp_path / "base")
    req = tiny_request(tmp_path, "lora", steps, zero2(steps), base)
    # the same training twice in one worker group: the first completes, the second is killed and resumed
    first, second = tmp_path / "first", tmp_path / "second"
    killed = train_with_a_kill(tmp_path, dashboard, [TrainJob(req, str(first)), TrainJob(req, str(second))], kill_during=1, every=every)
    assert killed, "no training worker was killed"
    assert not list((tmp_path / "ray_train").iterdir()), "Ray Train storage left behind after success"

    done = json.loads((first / "train_info.json").read_text())
    assert done["restarts"] == 0 and done["resumed_from_step"] is None  # complete before the kill: skipped, not redone
    info = json.loads((second / "train_info.json").read_text())
    assert info["restarts"] == 1
    assert killed["step"] <= info["resumed_from_step"] < steps and info["resumed_from_step"] % every == 0
    # steps continued from the checkpoint: one loss per step, and the same losses as the uninterrupted run
    # (engine, optimizer, scheduler, data order and RNG all restored)
    resumed, uninterrupted = (json.loads((d / "losses.json").read_text()) for d in (second, first))
    assert len(resumed) == steps
    assert resumed == pytest.approx(uninterrupted, abs=1e-5)
    check_adapter(second, base)


@pytest.mark.slow
def test_zero3_override_saves_gathered_models_and_resumes(tmp_path, dashboard):
    """zero_stage says 2, the override says 3 with every parameter partitioned: the effective stage decides the gather."""
    steps, every = 40, 10
    base = make_base(tmp_path / "base")
    override = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    ds = build_deepspeed_config(micro_batch_size=4, lr=1e-3, steps=steps, warmup_steps=2, zero_stage=2, grad_clip=1.0, bf16=False,
                                offload_optimizer=False, overrides=override)
    full, lora = tiny_request(tmp_path, "full", steps, ds, base), tiny_request(tmp_path, "lora", steps, ds, base)
    assert full.zero_stage == lora.zero_stage == 3
    jobs = [TrainJob(full, str(tmp_path / "full")), TrainJob(lora, str(tmp_path / "lora"))]
    assert train_with_a_kill(tmp_path, dashboard, jobs, kill_during=0, every=every)

    for job in jobs:
        info = json.loads((Path(job.out_dir) / "train_info.json").read_text())
        assert info["zero_stage"] == 3 and info["deepspeed_config"]["zero_optimization"]["stage"] == 3
        assert len(json.loads((Path(job.out_dir) / "losses.json").read_text())) == steps
    assert json.loads((tmp_path / "full" / "train_info.json").read_text())["resumed_from_step"] > 0  # ZeRO-3 full model resumed
    check_checkpoint(tmp_path / "full", base)  # every tensor whole (an ungathered save writes shape [0])
    check_adapter(tmp_path / "lora", base)
