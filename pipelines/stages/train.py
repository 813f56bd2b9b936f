"""Stage `train`: one LoRA adapter per skill, all trained in one Ray Train run driving DeepSpeed ZeRO.

Inputs: the base model and each skill's training JSONL (from `testbed`), the job's `train` section.
The skills train one after another in the same worker group, so the group's start-up (tens of
seconds on a small machine) is paid once per stage, not once per skill. Reused adapters are skipped.
Outputs: `<root>/train/<skill>-<key>/`, a PEFT adapter folder (+ `train_info.json`, `losses.json`).
Logs (child run `train/<skill>`): loss per step, engine class, ZeRO stage, world size, the adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.cache import content_key, file_digest
from pipelines.context import Item, RunContext, StageResult
from pipelines.training.loop import LOOP_VERSION
from pipelines.training.trainer import TrainRequest, run_training

NAME = "train"


def replay_source(prep: dict, tr) -> dict | None:
    """{"train": path, "key": digest} of the data replayed in every training batch, or None without replay."""
    if tr.replay_fraction <= 0:
        return None
    if tr.replay_data in prep["data"]:
        return prep["data"][tr.replay_data]
    return {"train": str(Path(tr.replay_data).resolve()), "key": file_digest(tr.replay_data)}


def run(ctx: RunContext) -> StageResult:
    spec, tr = ctx.spec, ctx.spec.train
    prep = ctx.results["testbed"].info
    result = StageResult(NAME)
    replay = replay_source(prep, tr)
    data = {s.name: prep["data"][s.name] for s in spec.skills}
    params = tr.model_dump(mode="json")
    items = [Item(name, content_key(prep["base_key"], d["key"], replay and replay["key"], tr, LOOP_VERSION), {"skill": name, **params})
             for name, d in data.items()]

    def build(todo) -> dict[str, dict[str, float]]:
        reqs = []
        for name, (tmp, run) in todo.items():
            reqs.append(TrainRequest(
                model_path=prep["base"], tokenizer_path=prep["tokenizer"], data_path=data[name]["train"], out_dir=str(tmp), mode="lora",
                steps=tr.steps, batch_size=tr.batch_size, lr=tr.lr, seed=tr.seed, zero_stage=tr.zero_stage,
                num_workers=tr.num_workers, accelerator=tr.accelerator, warmup_steps=tr.warmup_steps, bf16=tr.bf16,
                offload_optimizer=tr.offload_optimizer, max_length=tr.max_length, lora=tr.lora.model_dump(),
                replay_path=replay and replay["train"], replay_fraction=tr.replay_fraction,
                deepspeed=tr.deepspeed, threads_per_worker=tr.cpus_per_worker,
                tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id))
            ctx.log(f"  train/{name}: LoRA r={tr.lora.rank}, ZeRO-{tr.zero_stage}, {tr.num_workers} workers, {tr.steps} steps")
        run_training(reqs, ctx.root / "ray_train", "train-" + "-".join(todo))
        metrics = {}
        for name, (tmp, run) in todo.items():
            info = json.loads((tmp / "train_info.json").read_text())
            run.params({"deepspeed.engine_class": info["engine_class"], "deepspeed.zero_stage": info["zero_stage"],
                        "deepspeed.world_size": info["world_size"]})
            run.artifact(tmp, "adapter")
            metrics[name] = {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"],
                             "steps_per_second": info["steps_per_second"]}
        return metrics

    ctx.run_items(NAME, items, build, result)
    return result
