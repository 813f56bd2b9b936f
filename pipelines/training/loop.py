"""The per-worker training function Ray Train runs on every worker: DeepSpeed ZeRO, PEFT LoRA or full.

Everything arrives through `config` (paths are absolute: Ray Train V2 workers run in a temporary
working directory). `config["jobs"]` is a list of trainings run one after another in the same worker
group, so a later job may start from an earlier job's output and the group's start-up is paid once.
Rank 0 logs each job's loss to its MLflow run as it goes and writes the trained adapter or model
folder to the job's `out_dir` (on storage every node sees, like the rest of a run's outputs).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

# Part of every trained output's content key: bump it when a change here changes what a request trains,
# so outputs cached by an older loop are rebuilt rather than reused (2: replay mixed into every batch).
LOOP_VERSION = 2


def train_loop(config: dict[str, Any]) -> None:
    """Run every job in `config["jobs"]`; see `pipelines.training.trainer.TrainRequest`."""
    if config["accelerator"] == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import ray.train
    import torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    losses = {}
    for job in config["jobs"]:
        losses[Path(job["out_dir"]).name] = train_one(job, rank, world)
    ray.train.report({"final_loss": list(losses.values())[-1], "jobs": len(losses)})


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


def train_one(cfg: dict[str, Any], rank: int, world: int) -> float:
    """Train one model or adapter with DeepSpeed and write it to `cfg["out_dir"]`; returns the final loss."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft.data import collate, encode_examples, read_jsonl
    from pipelines.training.deepspeed_config import build_deepspeed_config

    torch.manual_seed(cfg["seed"])
    tok = AutoTokenizer.from_pretrained(cfg["tokenizer_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=torch.float32)
    if cfg["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)

    ds_cfg = build_deepspeed_config(
        micro_batch_size=cfg["batch_size"], lr=cfg["lr"], steps=cfg["steps"], warmup_steps=cfg["warmup_steps"],
        zero_stage=cfg["zero_stage"], grad_clip=cfg["grad_clip"], bf16=cfg["bf16"],
        offload_optimizer=cfg["offload_optimizer"], overrides=cfg["deepspeed"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_cfg)

    rows = read_jsonl(cfg["data_path"])
    skill = _Pool(encode_examples(tok, rows[rank::world], cfg["max_length"], cfg["loss_on"]), cfg["seed"] * 1000 + rank,
                  cfg["data_path"])
    replay, n_replay = None, 0
    if cfg.get("replay_path") and cfg.get("replay_fraction", 0) > 0:
        # a fixed share of every batch comes from the whole replay set, however small the skill's data is
        replay_rows = encode_examples(tok, read_jsonl(cfg["replay_path"])[rank::world], cfg["max_length"], cfg["loss_on"])
        replay = _Pool(replay_rows, cfg["seed"] * 1000 + rank + 500, cfg["replay_path"])
        n_replay = min(cfg["batch_size"] - 1, max(1, round(cfg["batch_size"] * cfg["replay_fraction"])))

    tracker = None
    if rank == 0 and cfg.get("tracking_uri") and cfg.get("mlflow_run_id"):
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(cfg["tracking_uri"])
    pending: list = []

    def flush() -> None:
        if tracker and pending:
            tracker.log_batch(cfg["mlflow_run_id"], metrics=pending)
            pending.clear()

    losses: list[float] = []
    t0 = time.time()
    engine.train()
    for step in range(cfg["steps"]):
        examples = skill.take(cfg["batch_size"] - n_replay) + (replay.take(n_replay) if replay else [])
        batch = {k: v.to(engine.device) for k, v in collate(examples, tok.pad_token_id).items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if tracker is not None:
            pending.append(Metric("train_loss", losses[-1], int(time.time() * 1000), step))
            if len(pending) >= cfg.get("log_every", 20):
                flush()
    flush()
    seconds = time.time() - t0

    final = sum(losses[-10:]) / max(1, len(losses[-10:]))
    info = {
        "engine_class": type(engine).__name__,
        "engine_module": type(engine).__module__,
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": world,
        "mode": cfg["mode"],
        "steps": cfg["steps"],
        "final_loss": final,
        "train_seconds": seconds,
        "steps_per_second": cfg["steps"] / seconds if seconds else 0.0,
        "trainable_parameters": n_trainable,
        "deepspeed_config": ds_cfg,
    }
    out = Path(cfg["out_dir"])
    module = engine.module
    with _gathered(trainable if cfg["mode"] == "lora" else module.parameters(), cfg["zero_stage"]):
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            module.save_pretrained(str(out))
            tok.save_pretrained(str(out))
            (out / "train_info.json").write_text(json.dumps(info, indent=1, default=str))
            (out / "losses.json").write_text(json.dumps(losses))
    dist.barrier()
    engine.destroy()
    return final
