"""The per-worker training function Ray Train runs on every worker: DeepSpeed ZeRO, PEFT LoRA or full.

What a data row is and what loss a batch gives is the request's objective (`objectives.OBJECTIVES`: `sft` by
default, `dpo` on preference pairs); the loop around it (pools, replay, checkpoints, logging) is the same.

Everything arrives through `config` (paths are absolute: Ray Train V2 workers run in a temporary
working directory). `config["jobs"]` is a list of `TrainJob`s run one after another in the same worker
group, so a later job may start from an earlier job's output and the group's start-up is paid once.
Rank 0 logs each job's loss to its MLflow run as it goes and writes the trained adapter or model
folder to the job's `out_dir` (on storage every node sees, like the rest of a run's outputs), with
`train_info.json` written last: a job whose out_dir holds it is complete.

Every `checkpoint_every` steps each rank saves the DeepSpeed engine (weights, optimizer, scheduler) and
its own loop state (step, the data pools' order and RNG, torch's RNG, the losses so far) into a local
folder and reports it to Ray Train. When a worker dies, Ray Train restarts the group
(`FailureConfig.max_failures`); the new workers skip the jobs already complete and resume the job in
progress from its last checkpoint, so its step count, sample order and loss history continue.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipelines.training.checkpoints import Resume
    from pipelines.training.trainer import TrainJob

# Part of every trained output's content key: bump it when a change here changes what a request trains,
# so outputs cached by an older loop are rebuilt rather than reused (2: replay mixed into every batch;
# 3: the effective DeepSpeed config, not the requested stage, decides the gather before a ZeRO-3 save).
LOOP_VERSION = 3
INFO, LOSSES = "train_info.json", "losses.json"


def train_loop(config: dict[str, Any]) -> None:
    """Run (or, after a restart, finish) every job in `config["jobs"]`; see `pipelines.training.trainer`."""
    if config["accelerator"] == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    from pipelines.training.extension_locks import clear_stale_locks, extension_roots

    # before DeepSpeed loads an op: a lock left by a killed build would make every rank wait forever.
    # TORCH_EXTENSIONS_DIR is torch's own setting for where it builds; read here, where the worker starts.
    clear_stale_locks(extension_roots(os.environ.get("TORCH_EXTENSIONS_DIR")))
    import ray.train
    import torch
    import torch.distributed as dist

    from pipelines.training.checkpoints import Resume

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config["threads_per_worker"])))
    checkpoint = ray.train.get_checkpoint()
    finals: list[float] = []
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as restored:
        resume = Resume.read(Path(restored), rank) if restored else None
        for index, job in enumerate(config["jobs"]):
            info = Path(job.out_dir) / INFO
            done = [info.is_file()]
            dist.broadcast_object_list(done, src=0)  # every rank follows rank 0's view of the shared out_dir
            if done[0]:
                finals.append(json.loads(info.read_text())["final_loss"])
                continue
            here = resume if resume is not None and resume.job == index else None
            finals.append(train_one(job, rank, world, index, config["checkpoint_every"], here, config.get("progress")))
    ray.train.report({"final_loss": finals[-1], "jobs": len(finals)})


def _gathered(params, zero_stage: int):
    """Materialise ZeRO-3 partitioned parameters on every rank (a no-op below stage 3)."""
    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


class _Pool:
    """Examples served in a fresh seeded shuffle each pass, so every example is seen once per epoch."""

    def __init__(self, examples: list, seed: int, source: str) -> None:
        if not examples:
            raise ValueError(f"{source}: too few examples to give every training worker one")
        self.examples, self.rng, self.order = examples, random.Random(seed), []

    def take(self, n: int) -> list:
        while len(self.order) < n:
            fresh = list(range(len(self.examples)))
            self.rng.shuffle(fresh)
            self.order += fresh
        idx, self.order = self.order[:n], self.order[n:]
        return [self.examples[i] for i in idx]

    def state(self) -> dict[str, Any]:
        """Position and RNG, as JSON: a pool restored from it serves the same examples next."""
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self.order)}

    def restore(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])


def _system_metrics(job: TrainJob, resumed: bool):
    """MLflow's own system-metrics monitor on rank 0's node (CPU, memory, disk, network, and GPU where NVML sees one),
    sampling every `job.system_metrics_every_s` into the job's run as `system/...`; a resumed attempt goes on from
    the steps the killed one logged."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(job.mlflow_run_id, sampling_interval=job.system_metrics_every_s, samples_before_logging=1,
                                   resume_logging=resumed, tracking_uri=job.tracking_uri)
    monitor.start()
    return monitor


def _numel(p) -> int:
    """A parameter's full size, also when ZeRO-3 holds only this rank's shard of it (`ds_numel`)."""
    return int(getattr(p, "ds_numel", p.numel()))


def _local_share(params) -> float:
    """The share of the model's weights this rank holds in memory (1.0 unless ZeRO-3 loaded it sharded)."""
    params = list(params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return local / max(1, sum(_numel(p) for p in params))


def train_one(job: TrainJob, rank: int, world: int, index: int, checkpoint_every: int, resume: Resume | None,
              progress: str | None = None) -> float:
    """Train one model or adapter with DeepSpeed and write it to `job.out_dir`; returns the final loss.

    With `resume`, the engine and the loop state come from that checkpoint and training goes on from its step.
    With `progress` (a folder the driver reads), rank 0 writes where it is there (`pipelines.training.progress`).
    """
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from graft.data import encode_examples, read_jsonl
    from pipelines.training import checkpoints
    from pipelines.training.deepspeed_config import zero_stage_of
    from pipelines.training.modes import MODES
    from pipelines.training.objectives import OBJECTIVES
    from pipelines.training.progress import WRITE_EVERY_S, Position, position_file, write_position

    req = job.request
    if req.loop_version != LOOP_VERSION:
        raise ValueError(f"request made for training loop version {req.loop_version}, this loop is version {LOOP_VERSION}")
    torch.manual_seed(req.seed)
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path, trust_remote_code=req.trust_remote_code)
    mode = MODES[req.mode]
    stage = zero_stage_of(req.deepspeed)
    # Under ZeRO-3, HF's DeepSpeed integration loads the checkpoint inside `deepspeed.zero.Init` while this object is
    # alive, so each rank materialises only its shard of the weights, never the whole model.
    sharded_load = HfDeepSpeedConfig(req.deepspeed) if stage == 3 and not mode.needs_full_weights else None
    model = AutoModelForCausalLM.from_pretrained(req.model.path, dtype=torch.float32, use_safetensors=True,
                                                 trust_remote_code=req.trust_remote_code)
    loaded_share = _local_share(model.parameters())
    if mode.wrap is not None:
        model = mode.wrap(model, req, tok)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(_numel(p) for p in trainable)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=req.deepspeed)
    sharded, sharded_load = sharded_load is not None, None  # HF's ZeRO-3 switch off again: saving gathers on its own
    if engine.zero_optimization_stage() != stage:
        raise RuntimeError(f"DeepSpeed runs ZeRO-{engine.zero_optimization_stage()}, the effective config says ZeRO-{stage}")

    objective = OBJECTIVES[req.objective]
    rows = read_jsonl(req.data.path, objective.fields)
    skill = _Pool(objective.encode(tok, rows[rank::world], req), req.seed * 1000 + rank, req.data.path)
    replay, n_replay = None, 0
    if req.replay is not None and req.replay_fraction > 0:
        # a fixed share of every batch comes from the whole replay set, however small the skill's data is
        replay_rows = encode_examples(tok, read_jsonl(req.replay.path)[rank::world], req.max_length, req.loss_on)
        replay = _Pool(replay_rows, req.seed * 1000 + rank + 500, req.replay.path)
        n_replay = min(req.batch_size - 1, max(1, round(req.batch_size * req.replay_fraction)))

    start, losses, seconds, restarts = 0, [], 0.0, 0
    if resume is not None:
        checkpoints.load(engine, resume, adapter=mode.adapter)
        state = resume.rank_state
        skill.restore(state["skill"])
        if replay is not None:
            replay.restore(state["replay"])
        checkpoints.restore_rng(state["rng"])
        start, losses, seconds, restarts = resume.step, list(state["losses"]), state["seconds"], resume.restarts + 1

    tracker, logged, monitor = None, set(), None
    if rank == 0 and job.tracking_uri and job.mlflow_run_id:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(job.tracking_uri)
        if resume is not None:  # steps the killed attempt already logged are not logged twice
            logged = {m.step for m in tracker.get_metric_history(job.mlflow_run_id, "train_loss")}
        if job.system_metrics_every_s > 0:
            monitor = _system_metrics(job, resumed=resume is not None)
    pending: list = []

    def flush() -> None:
        if tracker and pending:
            tracker.log_batch(job.mlflow_run_id, metrics=pending)
            pending.clear()

    def save_checkpoint(done: int, trained_seconds: float) -> None:
        state = {"skill": skill.state(), "replay": replay.state() if replay else None, "rng": checkpoints.rng_state(),
                 "losses": losses, "seconds": trained_seconds}
        checkpoints.save(engine, rank=rank, job=index, step=done, restarts=restarts, adapter=mode.adapter, state=state,
                         metrics={"job": index, "step": done, "train_loss": losses[-1]})

    engine.train()
    t0, paused = time.time(), 0.0  # checkpoint saves are not training time
    reported = 0.0

    def elapsed() -> float:
        return seconds + time.time() - t0 - paused

    for step in range(start, req.steps):
        examples = skill.take(req.batch_size - n_replay) + (replay.take(n_replay) if replay else [])
        loss = objective.loss(engine, examples, tok.pad_token_id, req)
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if tracker is not None and step not in logged:
            pending.append(Metric("train_loss", losses[-1], int(time.time() * 1000), step))
            if len(pending) >= job.log_every:
                flush()
        done = step + 1
        if rank == 0 and progress and (done == req.steps or time.time() - reported >= WRITE_EVERY_S):
            write_position(position_file(Path(progress), index), Position(index, done, req.steps, losses[-1], elapsed()))
            reported = time.time()
        if done % checkpoint_every == 0 and done < req.steps:
            flush()
            c0 = time.time()
            save_checkpoint(done, elapsed())
            paused += time.time() - c0
    flush()
    if monitor is not None:
        monitor.finish()
    attempt = time.time() - t0 - paused

    final = sum(losses[-10:]) / max(1, len(losses[-10:]))
    info = {
        "engine_class": type(engine).__name__,
        "engine_module": type(engine).__module__,
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": world,
        "mode": req.mode,
        "steps": req.steps,
        "final_loss": final,
        "train_seconds": seconds + attempt,
        "steps_per_second": (req.steps - start) / attempt if attempt > 0 else 0.0,  # this attempt's rate
        "trainable_parameters": n_trainable,
        "sharded_load": sharded,
        "loaded_share": loaded_share,  # of the checkpoint's weights, on rank 0 after loading: ~1/world when sharded
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this rank's process, model and optimizer included
        "resumed_from_step": resume.step if resume is not None else None,
        "restarts": restarts,
        "checkpoint_every": checkpoint_every,
        "deepspeed_config": req.deepspeed,
    }
    out = Path(job.out_dir)
    module = engine.module
    with _gathered(trainable if mode.adapter else module.parameters(), stage):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            (out / LOSSES).write_text(json.dumps(losses))
            part = out / f".{INFO}.part"
            part.write_text(json.dumps(info, indent=1, default=str))
            part.replace(out / INFO)  # last, and whole: its presence says the job is complete
    dist.barrier()
    engine.destroy()
    return final
