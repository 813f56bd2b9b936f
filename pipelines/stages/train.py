"""Stage `train`: one expert per skill, all trained in one Ray Train run driving DeepSpeed ZeRO.

Reads `Base` and `Datasets`; writes `Experts`; uses the job's `train` section. An expert is a LoRA
adapter (`train.method: lora`) or a fully fine-tuned checkpoint of the base (`full`, GraftLLM's SFT).
Each skill's `TrainRequest` holds everything its adapter depends on (inputs by content key, the
effective DeepSpeed config resolved here on the driver, every setting), and its content key is the
output's. The skills train one after another in the same worker group, so the group's start-up (tens
of seconds on a small machine) is paid once per stage, not once per skill; the group checkpoints every
`train.checkpoint_every` steps and resumes after a worker failure. Reused experts are skipped; a new
one is checked (`graft.model_checks.check_adapter` / `check_checkpoint` against the base) before it is
committed, so a broken one fails the stage instead of being cached. A run whose loss went backwards after an early
best (`pipelines.training.loss_curve`) is a warning on the job's summary.
Outputs: `<root>/train/<skill>-<key>/`, a PEFT adapter or checkpoint folder (+ `train_info.json`, `losses.json`).
Logs (child run `train/<skill>`): loss per step, engine class, effective ZeRO stage, world size, and
the adapter itself (a full checkpoint is not copied into MLflow; its folder is the run's `graftline.expert` tag).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.artifacts import Base, Datasets, Experts
from pipelines.cache import Ref
from pipelines.context import Item, RunContext, StageResult
from pipelines.training.experts import METHODS, expert_requests
from pipelines.training.loop import LOSSES
from pipelines.training.loss_curve import went_backwards
from pipelines.training.trainer import TrainJob, run_training

NAME = "train"
READS = (Base, Datasets)
WRITES = (Experts,)
SECTIONS = ("train",)


def run(ctx: RunContext) -> StageResult:
    spec, tr = ctx.spec, ctx.spec.train
    base = ctx.board.get(Base)
    method = METHODS[tr.method]
    result = StageResult(NAME)
    reqs = expert_requests(spec, base, ctx.board.get(Datasets))
    params = tr.model_dump(mode="json")
    items = [Item(name, req.key(), {"skill": name, **params, "deepspeed.zero_stage": req.zero_stage}) for name, req in reqs.items()]

    def build(todo) -> dict[str, dict[str, float]]:
        method.precheck(base.model.path, tr, spec.trust_remote_code)
        jobs = []
        for name, (tmp, run) in todo.items():
            req = reqs[name]
            jobs.append(TrainJob(req, str(tmp), tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id,
                                 system_metrics_every_s=ctx.spec.tracking.system_metrics_every_s))
            ctx.log(f"  train/{name}: {method.describe(tr)}, ZeRO-{req.zero_stage}, {req.num_workers} workers, {req.steps} steps")
        run_training(jobs, ctx.root / "ray_train", "train-" + "-".join(todo), checkpoint_every=tr.checkpoint_every,
                     max_failures=tr.max_failures, log=ctx.log, names={str(tmp): f"train/{n}" for n, (tmp, _) in todo.items()})
        infos = {}
        for name, (tmp, _) in todo.items():  # every expert checked before any is logged or committed
            method.check(tmp, reqs[name].model.path, trust_remote_code=spec.trust_remote_code)
            infos[name] = json.loads((tmp / "train_info.json").read_text())
        metrics = {}
        for name, (tmp, run) in todo.items():
            info = infos[name]
            run.params({"deepspeed.engine_class": info["engine_class"], "deepspeed.world_size": info["world_size"]})
            if info["restarts"]:
                run.tags({"graftline.restarts": str(info["restarts"]), "graftline.resumed_from_step": str(info["resumed_from_step"])})
            if method.log_folder:
                run.artifact(tmp, "adapter")
            else:
                run.tags({"graftline.expert": str(ctx.output_path(NAME, name, reqs[name].key()))})
            metrics[name] = {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"],
                             "steps_per_second": info["steps_per_second"]}
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    for name, path in paths.items():  # a reused expert's curve is judged again: its warning is this job's too
        backwards = went_backwards(json.loads((Path(path) / LOSSES).read_text()))
        if backwards:
            result.warnings.append(f"{name}: {backwards}")
    result.artifacts.append(Experts({name: Ref(str(path), reqs[name].key()) for name, path in paths.items()}, kind=tr.method))
    return result
