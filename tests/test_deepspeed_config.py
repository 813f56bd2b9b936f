"""The effective DeepSpeed config, whole-request content keys for train and testbed, and stale build locks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from graft.testbed.recipes import testbed_recipes as recipes_for
from pipelines.artifacts import Base, Datasets, Split
from pipelines.cache import Ref
from pipelines.spec import SpecError, TrainSpec, parse_job
from pipelines.stages.testbed import model_requests
from pipelines.training.experts import adapter_deepspeed, expert_requests as train_requests
from pipelines.training.deepspeed_config import build_deepspeed_config, zero_stage_of
from pipelines.training.extension_locks import clear_stale_locks
from pipelines.training.trainer import TrainJob
from tests.conftest import REPO

ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def job(**sections) -> object:
    return parse_job({"name": "t", "skills": [{"name": "reverse"}], **sections}, "job.yaml")


def test_an_override_sets_the_stage_that_runs_not_the_field():
    tr = TrainSpec(zero_stage=2, deepspeed=ZERO3)
    cfg = adapter_deepspeed(tr)
    assert zero_stage_of(cfg) == 3 and cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert zero_stage_of(adapter_deepspeed(TrainSpec(zero_stage=1))) == 1
    assert zero_stage_of({}) == 0  # DeepSpeed's own default when a config names no stage
    with pytest.raises(ValueError, match="zero_optimization.stage: expected 0, 1, 2 or 3, got 'three'"):
        zero_stage_of({"zero_optimization": {"stage": "three"}})


def test_the_cluster_zero3_file_runs_zero3_in_the_testbed_too(monkeypatch, tmp_path):
    """cluster/jobs/gpu-demo.yaml's case: train.deepspeed names a ZeRO-3 file, testbed.zero_stage stays 2."""
    monkeypatch.chdir(REPO)
    spec = job(train={"deepspeed": "cluster/deepspeed/zero3-bf16.json"}, testbed={"zero_stage": 2})
    recipes = recipes_for(["base-v1"], family="llama", size="tiny", seed=0, pretrain_examples=10, pretrain_steps=5, lr=1e-3,
                              evolve_steps=5, align_steps=5, target_steps=5, source_skill="reverse", source_family="qwen2",
                              source_steps=5, source_replay_fraction=0.0)
    data = {recipes[0].data: {"train": str(tmp_path / "d.jsonl"), "key": "dk"}}
    reqs = model_requests(spec, recipes, data, tmp_path / ".init", lambda name, key: tmp_path / f"{name}-{key}")
    assert reqs["base-v1"].zero_stage == 3 and spec.testbed.zero_stage == 2
    assert train_requests(spec, base_at(tmp_path / "base"), data_at(tmp_path))["reverse"].zero_stage == 3


@pytest.mark.parametrize("overrides, message", [
    ({"gradient_accumulation_steps": 4}, "train.deepspeed: gradient_accumulation_steps: set by train.batch_size"),
    ({"train_micro_batch_size_per_gpu": 4}, "train.deepspeed: train_micro_batch_size_per_gpu: set by train.batch_size"),
    ({"zero_optimization": {"stage": 5}}, "train.deepspeed: zero_optimization.stage: expected 0, 1, 2 or 3, got 5"),
    ({"zero_optimization": 3}, "train.deepspeed: zero_optimization: expected a mapping"),
])
def test_overrides_that_cannot_merge_are_refused_at_validate_time(overrides, message):
    with pytest.raises(SpecError) as e:
        job(train={"deepspeed": overrides})
    assert len(e.value.lines) == 1 and e.value.lines[0].startswith(f"job.yaml: {message}")
    with pytest.raises(ValueError, match="DeepSpeed overrides: "):
        build_deepspeed_config(micro_batch_size=4, lr=1e-3, steps=10, warmup_steps=1, zero_stage=2, grad_clip=1.0, bf16=False,
                               offload_optimizer=False, overrides=overrides)


def test_checkpoint_every_and_max_failures_are_bounded():
    assert TrainSpec().checkpoint_every > 0 and TrainSpec().max_failures > 0
    for bad in ({"checkpoint_every": 0}, {"max_failures": -1}, {"max_failures": 1000}):
        with pytest.raises(SpecError, match=f"train.{next(iter(bad))}"):
            job(train=bad)


def base_at(folder: Path, key: str = "bk") -> Base:
    return Base(Ref(str(folder), key), Ref(str(folder), key))


def data_at(tmp: Path) -> Datasets:
    return Datasets({"reverse": Split(Ref(str(tmp / "r.jsonl"), "dk:train"), Ref(str(tmp / "t.jsonl"), "dk:test"))})


def train_key(tmp: Path, **train) -> str:
    return train_requests(job(train=train), base_at(tmp / "base"), data_at(tmp))["reverse"].key()


def test_train_key_is_the_whole_request(tmp_path):
    key = train_key(tmp_path)
    changed = [train_key(tmp_path, deepspeed=ZERO3), train_key(tmp_path, cpus_per_worker=2), train_key(tmp_path, zero_stage=3),
               train_key(tmp_path, lora={"rank": 4}), train_key(tmp_path, num_workers=1)]
    assert key not in changed and len(set(changed)) == len(changed)
    assert train_requests(job(trust_remote_code=True), base_at(tmp_path / "base"), data_at(tmp_path))["reverse"].key() != key
    # how a run is tracked or resumed is not what it trains
    assert train_key(tmp_path, checkpoint_every=7, max_failures=0) == key
    # inputs by content key, not by where they lie
    assert train_requests(job(), base_at(Path("/elsewhere/base")), data_at(tmp_path / "moved"))["reverse"].key() == key
    assert train_requests(job(), base_at(tmp_path / "base", "other"), data_at(tmp_path))["reverse"].key() != key


def model_requests_for(tmp: Path, init_root: Path | None = None, **sections) -> dict:
    spec = job(**sections)
    recipes = recipes_for(["base-v1", "base-v2"], family="llama", size="tiny", seed=0, pretrain_examples=10, pretrain_steps=5,
                              lr=1e-3, evolve_steps=5, align_steps=5, target_steps=5, source_skill="reverse", source_family="qwen2",
                              source_steps=5, source_replay_fraction=0.0)
    data = {r.data: {"train": str(tmp / f"{r.data.name}.jsonl"), "key": f"k-{r.data.name}"} for r in recipes}
    return model_requests(spec, recipes, data, init_root or tmp / ".init", lambda name, key: tmp / "testbed" / f"{name}-{key}")


def test_testbed_keys_cover_train_deepspeed_and_threads_and_chain_recipes(tmp_path):
    reqs = model_requests_for(tmp_path)
    v1, v2 = reqs["base-v1"], reqs["base-v2"]
    assert v2.model == Ref(str(tmp_path / "testbed" / f"base-v1-{v1.key()}"), v1.key())  # starts from base-v1's output
    for sections in ({"train": {"deepspeed": ZERO3}}, {"train": {"cpus_per_worker": 2}}, {"testbed": {"zero_stage": 3}},
                     {"compute": {"accelerator": "cuda"}}, {"seed": 1}):
        other = model_requests_for(tmp_path, **sections)
        assert other["base-v1"].key() != v1.key(), sections
        assert other["base-v2"].key() != v2.key(), sections  # a changed parent changes its children
    same = model_requests_for(tmp_path / "moved", init_root=tmp_path / "other-init")
    assert same["base-v1"].key() == v1.key() and same["base-v2"].key() == v2.key()


def test_where_a_job_writes_and_logs_is_not_in_its_key(tmp_path):
    req = train_requests(job(), base_at(tmp_path / "base"), data_at(tmp_path))["reverse"]
    a, b = TrainJob(req, str(tmp_path / "a"), "sqlite:///x.db", "run1"), TrainJob(req, str(tmp_path / "b"))
    assert a.request.key() == b.request.key() == req.key()


# stale torch extension build locks -------------------------------------------------------------

def build_dir(root: Path) -> Path:
    d = root / "py311_cpu" / "deepspeed_shm_comm"
    d.mkdir(parents=True)
    (d / "lock").touch()
    return d


def holder(lock_dir: Path, how: str, seconds: float = 60) -> subprocess.Popen:
    """A live process that holds `lock_dir/lock` open (torch's builder does), or only works in `lock_dir` (its ninja does)."""
    code = ("import os,sys,time; fd=os.open('lock', os.O_RDONLY) if sys.argv[1]=='fd' else None; print('ready', flush=True); "
            "time.sleep(float(sys.argv[2]))")
    proc = subprocess.Popen([sys.executable, "-c", code, how, str(seconds)], cwd=lock_dir, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_lock_whose_builder_is_gone_is_cleared_with_a_message(tmp_path):
    d = build_dir(tmp_path)
    lines: list[str] = []
    assert clear_stale_locks([tmp_path], log=lines.append) == [d / "lock"]
    assert not (d / "lock").exists()
    assert len(lines) == 1 and str(d / "lock") in lines[0] and "stale" in lines[0]
    assert clear_stale_locks([tmp_path], log=lines.append) == [] and len(lines) == 1  # nothing left: silent


def test_a_lock_a_live_builder_holds_is_left_alone(tmp_path):
    d = build_dir(tmp_path)
    proc = holder(d, "fd")
    try:
        assert clear_stale_locks([tmp_path], log=pytest.fail) == []
        assert (d / "lock").exists()
    finally:
        proc.kill()
        proc.wait()
    assert clear_stale_locks([tmp_path], log=lambda line: None) == [d / "lock"]  # its holder gone, it is stale


def test_a_dead_builders_compiler_still_running_is_waited_for(tmp_path):
    d = build_dir(tmp_path)
    orphan = holder(d, "cwd", seconds=1.0)
    lines: list[str] = []
    try:
        assert clear_stale_locks([tmp_path], log=lines.append, poll_s=0.05) == [d / "lock"]
        assert orphan.poll() is not None  # removed only once the orphan had finished
        assert f"waiting for processes [{orphan.pid}]" in lines[0] and "removed stale" in lines[1]
    finally:
        orphan.kill()
        orphan.wait()
    (d / "lock").touch()
    stuck = holder(d, "cwd")
    try:
        with pytest.raises(RuntimeError, match=f"processes \\[{stuck.pid}\\] still build there"):
            clear_stale_locks([tmp_path], log=lambda line: None, orphan_timeout_s=0.2, poll_s=0.05)
        assert (d / "lock").exists()
    finally:
        stuck.kill()
        stuck.wait()
