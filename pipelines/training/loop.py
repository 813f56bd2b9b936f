"""The per-worker training function that Ray Train runs on every worker: DeepSpeed ZeRO, PEFT LoRA or full.

Everything arrives through `config` (paths are absolute: Ray Train V2 workers run in a temporary
working directory). Rank 0 logs the loss to MLflow as it goes and reports the trained adapter or
model folder as a Ray Train checkpoint, which Ray persists to the run's storage path.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any


def _gathered(params, zero_stage: int):
    """Context that materialises ZeRO-3 partitioned parameters on every rank (no-op below stage 3)."""
    import contextlib

    if zero_stage < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def train_loop(config: dict[str, Any]) -> None:
    """Train one model or adapter; see `pipelines.training.trainer.run_training` for `config`."""
    if config["accelerator"] == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft.data import collate, encode_examples, read_jsonl
    from pipelines.training.deepspeed_config import build_deepspeed_config

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])

    tok = AutoTokenizer.from_pretrained(config["tokenizer_path"])
    model = AutoModelForCausalLM.from_pretrained(config["model_path"], dtype=torch.float32)
    if config["mode"] == "lora":
        from peft import LoraConfig, get_peft_model

        lora = config["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]

    ds_cfg = build_deepspeed_config(
        micro_batch_size=config["batch_size"], lr=config["lr"], steps=config["steps"],
        warmup_steps=config["warmup_steps"], zero_stage=config["zero_stage"], grad_clip=config["grad_clip"],
        bf16=config["bf16"], offload_optimizer=config["offload_optimizer"], overrides=config["deepspeed"])
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_cfg)

    examples = encode_examples(tok, read_jsonl(config["data_path"]), config["max_length"], config["loss_on"])
    shard = examples[rank::world]
    order_rng = random.Random(config["seed"] * 1000 + rank)

    tracker = None
    if rank == 0 and config.get("tracking_uri") and config.get("mlflow_run_id"):
        from mlflow.tracking import MlflowClient

        tracker = MlflowClient(config["tracking_uri"])
    pending: list = []

    def flush() -> None:
        if tracker and pending:
            tracker.log_batch(config["mlflow_run_id"], metrics=pending)
            pending.clear()

    losses: list[float] = []
    t0 = time.time()
    order: list[int] = []
    engine.train()
    for step in range(config["steps"]):
        if len(order) < config["batch_size"]:
            fresh = list(range(len(shard)))
            order_rng.shuffle(fresh)
            order += fresh
        idx, order = order[: config["batch_size"]], order[config["batch_size"]:]
        batch = collate([shard[i] for i in idx], tok.pad_token_id)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if tracker is not None:
            from mlflow.entities import Metric

            pending.append(Metric("train_loss", losses[-1], int(time.time() * 1000), step))
            if len(pending) >= config.get("log_every", 20):
                flush()
    flush()
    seconds = time.time() - t0

    info = {
        "engine_class": type(engine).__name__,
        "engine_module": type(engine).__module__,
        "zero_stage": engine.zero_optimization_stage(),
        "world_size": world,
        "mode": config["mode"],
        "steps": config["steps"],
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_seconds": seconds,
        "steps_per_second": config["steps"] / seconds if seconds else 0.0,
        "trainable_parameters": sum(p.numel() for p in trainable) if config["zero_stage"] < 3 else None,
        "deepspeed_config": ds_cfg,
    }
    with tempfile.TemporaryDirectory() as tmp:
        module = engine.module
        with _gathered(trainable if config["mode"] == "lora" else module.parameters(), config["zero_stage"]):
            if rank == 0:
                if config["mode"] == "lora":
                    module.save_pretrained(tmp)
                else:
                    module.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                (Path(tmp) / "train_info.json").write_text(json.dumps(info, indent=1, default=str))
                (Path(tmp) / "losses.json").write_text(json.dumps(losses))
        dist.barrier()
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report({"final_loss": info["final_loss"]}, checkpoint=checkpoint)
