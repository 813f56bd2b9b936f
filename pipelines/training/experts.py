"""How a job's experts are trained: the typed request of each skill's training, and what each `train.method` needs.

Shared by the stages that train experts: `train` (on the job's base) and `port` (the same adapter on a
newer base, PortLLM's reference fine-tune). Each request holds everything the expert depends on (inputs
by content key, the effective DeepSpeed config resolved on the driver, every setting).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from graft.model_checks import check_adapter, check_checkpoint, check_lora_targets, check_sparse_adapter, check_sparse_targets
from pipelines.artifacts import Base, Datasets
from pipelines.spec import JobSpec, TrainSpec
from pipelines.inputs import replay_ref
from pipelines.training.deepspeed_config import GRAD_CLIP, build_deepspeed_config
from pipelines.training.trainer import TrainRequest


@dataclass(frozen=True)
class Method:
    """What the stage does around one training method (`train.method`): the request's method settings,
    the check before anything runs, the check of each output, and whether the output is copied into MLflow."""

    settings: Callable[[TrainSpec], dict | None]
    precheck: Callable[[str, TrainSpec, bool], None]
    check: Callable[..., int]
    describe: Callable[[TrainSpec], str]
    log_folder: bool  # a full checkpoint is not copied into MLflow; its folder is the run's `graftline.expert` tag


METHODS = {
    "lora": Method(settings=lambda tr: tr.lora.model_dump(mode="json"),
                   precheck=lambda base, tr, trc: check_lora_targets(base, tr.lora.target_modules, trust_remote_code=trc),
                   check=check_adapter, describe=lambda tr: f"LoRA r={tr.lora.rank}", log_folder=True),
    "sparse": Method(settings=lambda tr: tr.sparse.model_dump(mode="json"), precheck=lambda base, tr, trc: check_sparse_targets(
                         base, tr.sparse.target_modules, tr.sparse.keep_fraction, tr.sparse.match_lora_rank, trust_remote_code=trc),
                     check=check_sparse_adapter, describe=lambda tr: _describe_sparse(tr), log_folder=True),
    "full": Method(settings=lambda tr: None, precheck=lambda base, tr, trc: None, check=check_checkpoint,
                   describe=lambda tr: "full fine-tuning", log_folder=False),
}


def _describe_sparse(tr: TrainSpec) -> str:
    size = f"LoRA r{tr.sparse.match_lora_rank}'s size" if tr.sparse.match_lora_rank else f"keep {tr.sparse.keep_fraction:g}"
    return f"sparse adapter ({tr.sparse.rule}, {size})"


def adapter_deepspeed(tr: TrainSpec) -> dict:
    """The effective DeepSpeed config of a skill's expert training: the spec's settings, `tr.deepspeed` merged over them."""
    return build_deepspeed_config(micro_batch_size=tr.batch_size, lr=tr.lr, steps=tr.steps, warmup_steps=tr.warmup_steps,
                                  zero_stage=tr.zero_stage, grad_clip=GRAD_CLIP, bf16=tr.bf16, offload_optimizer=tr.offload_optimizer,
                                  overrides=tr.deepspeed)


def dpo_deepspeed(spec: JobSpec, micro_batch_size: int | None = None, schedule: tuple[int, int] | None = None) -> dict:
    """The effective DeepSpeed config of a skill's DPO training (stage `dpo`): the `dpo` section's schedule and batch,
    the `train` section's ZeRO stage, precision, offload and overrides. `micro_batch_size` (default `dpo.batch_size`
    pairs) is what one forward pass holds: the planner passes the pair's two sequences. `schedule` (steps, warmup
    steps) replaces the section's where the stage has capped it by `dpo.epochs`."""
    tr, d = spec.train, spec.dpo
    steps, warmup = schedule or (d.steps, d.warmup_steps)
    return build_deepspeed_config(micro_batch_size=micro_batch_size or d.batch_size, lr=d.lr, steps=steps,
                                  warmup_steps=warmup, zero_stage=tr.zero_stage, grad_clip=GRAD_CLIP, bf16=tr.bf16,
                                  offload_optimizer=tr.offload_optimizer, overrides=tr.deepspeed)


def expert_requests(spec: JobSpec, base: Base, data: Datasets) -> dict[str, TrainRequest]:
    """Each skill's whole training request, from the base, the job's datasets and its `train` section."""
    tr = spec.train
    deepspeed = adapter_deepspeed(tr)
    replay = replay_ref(data, tr.replay_data, tr.replay_fraction)
    return {s.name: TrainRequest(
        model=base.model, tokenizer=base.tokenizer, data=data[s.name].train, mode=tr.method, steps=tr.steps,
        batch_size=tr.batch_size,
        seed=tr.seed, deepspeed=deepspeed, num_workers=tr.num_workers, accelerator=spec.compute.accelerator,
        threads_per_worker=tr.cpus_per_worker,
        max_length=tr.max_length, replay=replay, replay_fraction=tr.replay_fraction, adapter=METHODS[tr.method].settings(tr),
        trust_remote_code=spec.trust_remote_code) for s in spec.skills}
