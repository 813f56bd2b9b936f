"""`graft plan JOB`: before anything runs, what each stage asks Ray for and the peak memory of each of its workers,
checked against the cluster's largest node. `graft run` makes the same check first.

Why: a stage that cannot fit fails late and expensively (Ray up, weights loaded, DeepSpeed initialised, earlier
stages done). The sizes come from the job's own models built on the meta device (`graft.memory`), so they are exact
counts for the real architecture, not a table of known models; no weight is read, no Ray is started.

Per stage, one `StagePlan`: how many workers or tasks it runs at once, what one of them asks Ray for, and its memory:
model states (weights, gradients, optimizer states or score accumulators), activations (or KV cache), and host memory
a GPU worker also needs. The estimators are registered per stage name in `ESTIMATORS`:

- `train` (and `testbed`, `dpo`, `port`'s reference fine-tunes): the effective DeepSpeed config decides the ZeRO stage,
  precision and offload (read from the config, never from `train.zero_stage`). A full fine-tune in bf16/fp16 at
  ZeRO-2/3 uses DeepSpeed's own estimators; everything else (LoRA and sparse adapters, fp32, ZeRO-0/1) uses
  `graft.memory.zero_states`. Activations at the micro batch and `max_length` (`graft.memory.training_activations`;
  the trainer does not recompute activations). A GPU worker first loads the checkpoint in fp32 on the host (its
  ZeRO-3 shard only, when the training mode allows a sharded load).
- `score`: the expert in the placement dtype, gradients and fp32 sums of the scored tensors (those the expert
  changed: an adapter's target modules, every weight for a full fine-tune), activations at `score.batch_size`.
- `pack`: the expert's deltas in fp32 and one dense matrix's SVD on the host; with calibration the expert (and with
  grid tuning the base) on the device with activations of a calibration batch.
- `graft`: the driver process: fusion streams tensor by tensor; `protected` also holds every skill's scores,
  `routed` the base for its router's feature pass.
- `evaluate` and the other evaluation stages: one model per task in the placement dtype, its KV cache for
  `evaluate.batch_size` rows of `train.max_length + evaluate.max_new_tokens` tokens.
A stage without an estimator is planned as one model task holding the base.

GB here is 10^9 bytes. A model named by a hub id that is not a local folder has no known size here (nothing is
downloaded): its stages say so and are not refused.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from graft.memory import (ModelShape, States, forward_activations, kv_cache, shape_from_config,
                          training_activations, zero_states)
from pipelines.placement import Placement, placement
from pipelines.recipes import Recipe, recipe_of
from pipelines.spec import JobSpec, TrainSpec
from pipelines.training.deepspeed_config import zero_stage_of

GB = 10**9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DEFAULT_NODE_GPUS = 8  # with no GPU visible here: one common 8-GPU node ...
DEFAULT_GPU_GB = 80.0  # ... of 80 GB GPUs
TESTBED = "testbed:"
HUB_UNKNOWN = "size unknown (hub id, not downloaded)"
TABLE_WIDTH = 100


class PlanError(ValueError):
    """A job with a stage that cannot fit the cluster's largest node; the message is one line."""


@dataclass(frozen=True)
class Node:
    """The cluster's largest node, which every stage's workers must fit: its GPUs, each GPU's memory, its RAM, its cores."""

    gpus: int
    gpu_gb: float
    ram_gb: float
    cpus: int

    def describe(self) -> str:
        gpus = f"{self.gpus} × {self.gpu_gb:g} GB GPU" if self.gpus else "no GPU"
        return f"{gpus}, {self.ram_gb:.0f} GB RAM, {self.cpus} CPUs"


def deepspeed_states(*, params: int, largest_layer: int, stage: int, gpus_per_node: int, nodes: int, offload_optimizer: bool,
                     offload_params: bool, zero_init: bool) -> States:
    """DeepSpeed's own estimate for a full fine-tune in 16-bit mixed precision at ZeRO-2 or ZeRO-3:
    `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, with their default 1.5× host
    buffer. `device` is per GPU; `host` is DeepSpeed's figure for one node, divided here over its GPUs (per worker).
    """
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload_optimizer)
    elif stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(params, largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer,
                                                            cpu_offload_params=offload_params, zero_init=zero_init)
    else:
        raise ValueError(f"DeepSpeed estimates ZeRO-2 and ZeRO-3 only, not ZeRO-{stage}")
    return States(device=int(gpu), host=int(math.ceil(cpu / gpus_per_node)))


def local_node() -> Node:
    """This machine as the largest node: its visible GPUs and the smallest one's memory (or, with none visible,
    8 GPUs of 80 GB), its physical RAM and its cores."""
    import torch

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    cpus = os.cpu_count() or 1
    if torch.cuda.is_available() and torch.cuda.device_count():
        count = torch.cuda.device_count()
        gpu_gb = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / GB
        return Node(count, round(gpu_gb, 1), ram, cpus)
    return Node(DEFAULT_NODE_GPUS, DEFAULT_GPU_GB, ram, cpus)


@dataclass(frozen=True)
class Model:
    """A model a stage opens: its shape, or why its size is unknown."""

    ref: str
    shape: ModelShape | None
    unknown: str | None = None


class ModelBook:
    """The models a job names, each sized once (per plan, no global cache): `base` (the job's base), `testbed:NAME`, a
    local checkpoint folder (its config.json on the meta device), or a hub id (unknown). `known` gives shapes outright."""

    def __init__(self, spec: JobSpec, known: Mapping[str, ModelShape] | None = None) -> None:
        self.spec = spec
        self._shapes: dict[str, Model] = {ref: Model(ref, shape) for ref, shape in (known or {}).items()}

    def get(self, ref: str) -> Model:
        if ref in self._shapes:
            return self._shapes[ref]
        name = self.spec.base if ref == "base" else ref
        name = TESTBED + "base-v1" if name == "testbed" else name  # the testbed's base is its first version
        if name not in self._shapes:
            self._shapes[name] = self._measure(name)
        self._shapes[ref] = self._shapes[name]
        return self._shapes[ref]

    def base(self) -> Model:
        return self.get("base")

    def _measure(self, name: str) -> Model:
        if name.startswith(TESTBED):
            return Model(name, self._testbed(name.removeprefix(TESTBED)))
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return Model(name, None, HUB_UNKNOWN)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=self.spec.trust_remote_code)
        return Model(name, shape_from_config(config, name, self.spec.trust_remote_code))

    def _testbed(self, name: str) -> ModelShape:
        """A testbed model's architecture: the family and size of the from-scratch model its recipe chain starts from."""
        from graft.testbed.models import model_config
        from graft.testbed.tokenizer import build_char_tokenizer

        root = self.spec.testbed.recipes([name], self.spec.seed)[0]
        tok = build_char_tokenizer()
        config = model_config(root.family, root.size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
        return shape_from_config(config, f"testbed {name} ({root.family}-{root.size})")


@dataclass(frozen=True)
class StagePlan:
    """One stage's plan: `tasks` workers or Ray tasks at once, each asking Ray for `ask`; per worker `states` and
    `activations` on `device` (cuda, cpu, or driver: the driver process), plus `host` memory a GPU worker also needs."""

    stage: str
    tasks: int
    ask: dict[str, float]
    device: str
    states: int = 0
    activations: int = 0
    host: int = 0
    zero_stage: int | None = None
    how: str = ""
    unknown: str | None = None
    gang: bool = False  # the workers run as one group (a training run), not as independent tasks

    @property
    def peak(self) -> int:
        """Peak memory of one worker on its device."""
        return self.states + self.activations

    @property
    def gpus(self) -> float:
        """GPUs one unit of the stage needs at once: a training worker group's, or one task's share."""
        share = float(self.ask.get("num_gpus", 0))
        return share * self.tasks if self.gang else share


@dataclass(frozen=True)
class Plan:
    """A job's plan: its base, the largest node, and each stage's plan in recipe order."""

    recipe: Recipe
    node: Node
    base_name: str
    base: Model
    trainable: int | None
    stages: list[StagePlan] = field(default_factory=list)


@dataclass(frozen=True)
class PlanInputs:
    """What a stage estimator reads: the job, the node, the placement of model tasks and the job's models."""

    spec: JobSpec
    node: Node
    where: Placement
    models: ModelBook

    @property
    def weight_bytes(self) -> int:
        return DTYPE_BYTES[self.where.dtype]


# ---------------------------------------------------------------- what each training method trains and changes


@dataclass(frozen=True)
class MethodSize:
    """Per `train.method`: parameters trained, tensor entries changed (what importance scores), bytes of its deltas in
    fp32, and the matrices its delta touches (what packing decomposes)."""

    trainable: Callable[[ModelShape, TrainSpec], int]
    changed: Callable[[ModelShape, TrainSpec], int]
    delta_bytes: Callable[[ModelShape, TrainSpec], int]
    matrices: Callable[[ModelShape, TrainSpec], list[tuple[str, int, int]]]


def _sparse_trainable(shape: ModelShape, tr: TrainSpec) -> int:
    sp = tr.sparse
    if sp.match_lora_rank:
        return shape.lora_params(sp.target_modules, sp.match_lora_rank)
    return int(sp.keep_fraction * shape.target_entries(sp.target_modules))


METHOD_SIZES: dict[str, MethodSize] = {
    "full": MethodSize(trainable=lambda s, tr: s.params, changed=lambda s, tr: s.params, delta_bytes=lambda s, tr: 4 * s.params,
                       matrices=lambda s, tr: list(s.matrices)),
    "lora": MethodSize(trainable=lambda s, tr: s.lora_params(tr.lora.target_modules, tr.lora.rank),
                       changed=lambda s, tr: s.target_entries(tr.lora.target_modules),
                       delta_bytes=lambda s, tr: 4 * s.lora_params(tr.lora.target_modules, tr.lora.rank),
                       matrices=lambda s, tr: s.targeted(tr.lora.target_modules)),
    # a sparse delta: fp32 values and int64 indices of its kept entries
    "sparse": MethodSize(trainable=_sparse_trainable, changed=lambda s, tr: s.target_entries(tr.sparse.target_modules),
                         delta_bytes=lambda s, tr: 12 * _sparse_trainable(s, tr),
                         matrices=lambda s, tr: s.targeted(tr.sparse.target_modules)),
}


# ---------------------------------------------------------------- estimators


def _unknown(stage: str, tasks: int, ask: dict[str, float], device: str, model: Model) -> StagePlan:
    return StagePlan(stage, tasks, ask, device, unknown=f"{model.ref}: {model.unknown}")


def training_plan(stage: str, inp: PlanInputs, model: Model, *, method: str, deepspeed: dict[str, Any], workers: int,
                  cpus_per_worker: int, max_length: int) -> StagePlan:
    """A DeepSpeed training worker group: `workers` workers, each `cpus_per_worker` CPUs and, on cuda, one GPU."""
    from pipelines.training.modes import MODES

    device = inp.where.device
    ask = {"num_cpus": float(cpus_per_worker), "num_gpus": 1.0 if device == "cuda" else 0.0}
    stage_no = zero_stage_of(deepspeed)
    if model.shape is None:
        return StagePlan(stage, workers, ask, device, zero_stage=stage_no, unknown=f"{model.ref}: {model.unknown}", gang=True)
    shape, tr = model.shape, inp.spec.train
    zero = deepspeed.get("zero_optimization", {})
    mixed = bool(deepspeed.get("bf16", {}).get("enabled") or deepspeed.get("fp16", {}).get("enabled"))
    weight_bytes = 2 if mixed else 4
    offload_opt = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
    offload_params = (zero.get("offload_param") or {}).get("device", "none") in ("cpu", "nvme")
    # a mode that needs every weight whole on each rank (or a Mode without the flag) loads the whole checkpoint
    sharded_load = stage_no == 3 and not getattr(MODES[method], "needs_full_weights", True)
    trainable = METHOD_SIZES[method].trainable(shape, tr)
    precision = "bf16/fp16" if mixed else "fp32"
    if trainable == shape.params and mixed and stage_no in (2, 3):  # what DeepSpeed's estimators assume
        per_node = min(workers, inp.node.gpus) if device == "cuda" and inp.node.gpus else workers
        states = deepspeed_states(params=shape.params, largest_layer=shape.largest_layer, stage=stage_no, gpus_per_node=per_node,
                                  nodes=math.ceil(workers / per_node), offload_optimizer=offload_opt, offload_params=offload_params,
                                  zero_init=sharded_load)
        load = 0  # DeepSpeed's host figure includes the checkpoint load
        how = f"full fine-tune, {precision}, DeepSpeed estimate_zero{stage_no}_model_states_mem_needs over {workers} workers"
    else:
        states = zero_states(trainable=trainable, frozen=shape.params - trainable, weight_bytes=weight_bytes, mixed=mixed,
                             stage=stage_no, world=workers, largest_layer=shape.largest_layer, offload_optimizer=offload_opt,
                             offload_params=offload_params)
        load = 4 * shape.params // (workers if sharded_load else 1)
        how = (f"{method}, {_count(trainable)} of {_count(shape.params)} params trained, {precision}, ZeRO-{stage_no} over "
               f"{workers} workers (graft.memory.zero_states)")
    micro = int(deepspeed.get("train_micro_batch_size_per_gpu", 1))
    acts = training_activations(shape, micro, max_length, weight_bytes)
    how += f"; activations at batch {micro} × {max_length} tokens"
    if device == "cuda":
        return StagePlan(stage, workers, ask, device, states.device, acts, states.host + load, stage_no, how, gang=True)
    return StagePlan(stage, workers, ask, device, states.device + states.host, acts, 0, stage_no, how, gang=True)


def _train(inp: PlanInputs) -> StagePlan:
    from pipelines.training.experts import adapter_deepspeed

    tr = inp.spec.train
    return training_plan("train", inp, inp.models.base(), method=tr.method, deepspeed=adapter_deepspeed(tr),
                         workers=tr.num_workers, cpus_per_worker=tr.cpus_per_worker, max_length=tr.max_length)


def _dpo(inp: PlanInputs) -> StagePlan:
    """The DPO training (the target's answers are generated first, by smaller model tasks): a pair's two sequences in
    one forward pass, so activations at twice `dpo.batch_size`."""
    from pipelines.training.experts import dpo_deepspeed

    tr, d = inp.spec.train, inp.spec.dpo
    return training_plan("dpo", inp, inp.models.base(), method=tr.method, deepspeed=dpo_deepspeed(inp.spec, 2 * d.batch_size),
                         workers=tr.num_workers, cpus_per_worker=tr.cpus_per_worker, max_length=tr.max_length)


def _testbed(inp: PlanInputs) -> StagePlan:
    """The testbed's models train one after another in one worker group: the largest of them is the peak."""
    spec = inp.spec
    if spec.base != "testbed":
        return StagePlan("testbed", 0, {}, "driver", how="data files only: the base is not a testbed model")
    from pipelines.stages.testbed import model_requests

    recipes = spec.testbed.recipes(sorted({"base-v1", *spec.testbed.models}), spec.seed)
    blank: defaultdict = defaultdict(lambda: {"train": "", "key": ""})  # the requests' data refs do not size anything
    reqs = model_requests(spec, recipes, blank, Path("."), lambda name, key: Path(name))
    plans = [training_plan("testbed", inp, inp.models.get(TESTBED + r.name), method=reqs[r.name].mode,
                           deepspeed=reqs[r.name].deepspeed, workers=reqs[r.name].num_workers,
                           cpus_per_worker=reqs[r.name].threads_per_worker, max_length=reqs[r.name].max_length) for r in recipes]
    largest = max(plans, key=lambda p: p.peak + p.host)
    name = recipes[plans.index(largest)].name
    return replace(largest, how=f"largest of {len(plans)} testbed models: {name}, {largest.how}")


def _score(inp: PlanInputs) -> StagePlan:
    spec, where = inp.spec, inp.where
    tasks, ask, model = spec.score.shards * len(spec.skills), where.ray_options(), inp.models.base()
    if model.shape is None:
        return _unknown("score", tasks, ask, where.device, model)
    shape, w = model.shape, inp.weight_bytes
    scored = METHOD_SIZES[spec.train.method].changed(shape, spec.train)
    states = shape.params * w + scored * (w + 4)
    acts = training_activations(shape, spec.score.batch_size, spec.train.max_length, w)
    how = (f"expert in {where.dtype}, gradients and fp32 sums of {_count(scored)} scored weights; activations at batch "
           f"{spec.score.batch_size} × {spec.train.max_length} tokens")
    return _model_task("score", tasks, ask, where, states, acts, how)


def _pack(inp: PlanInputs) -> StagePlan:
    from pipelines.stages.pack import CALIBRATION_BATCH

    spec, where, pk = inp.spec, inp.where, inp.spec.pack
    tasks, ask, model = len(spec.skills), where.ray_options(), inp.models.base()
    if model.shape is None:
        return _unknown("pack", tasks, ask, where.device, model)
    shape, w, tr = model.shape, inp.weight_bytes, spec.train
    method = METHOD_SIZES[tr.method]
    largest_matrix = max((r * c for _, r, c in method.matrices(shape, tr)), default=0)
    host = method.delta_bytes(shape, tr) + 3 * 4 * largest_matrix  # one dense delta, its U and V at once
    how = f"{tr.method} deltas in fp32 and one matrix's SVD on the host"
    states = acts = 0
    if pk.calibrate:
        loaded = 2 if pk.tune_steps > 0 else 1
        states = loaded * shape.params * w
        act_fn = training_activations if pk.tune_steps > 0 else forward_activations
        acts = act_fn(shape, CALIBRATION_BATCH, tr.max_length, w)
        how += f"; calibration: {loaded} model(s) in {where.dtype}, batch {CALIBRATION_BATCH} × {tr.max_length} tokens"
    if where.device == "cpu":
        return StagePlan("pack", tasks, ask, "cpu", states + host, acts, 0, how=how)
    return StagePlan("pack", tasks, ask, where.device, states, acts, host, how=how)


@dataclass(frozen=True)
class FusionSize:
    """What a `graft.method` holds in the driver beyond the tensor it is writing, and why."""

    extra: Callable[[ModelShape, JobSpec], int]
    note: str = ""


FUSION_SIZES: dict[str, FusionSize] = {
    "additive": FusionSize(lambda s, spec: 0),
    "protected": FusionSize(lambda s, spec: len(spec.skills) * 4 * METHOD_SIZES[spec.train.method].changed(s, spec.train),
                            "every skill's scores in fp32"),
    "routed": FusionSize(lambda s, spec: 4 * s.params + forward_activations(s, 1, spec.train.max_length, 4),
                         "the base in fp32 for the router's feature pass"),
}


def _graft(inp: PlanInputs) -> StagePlan:
    spec, model = inp.spec, inp.models.base()
    if model.shape is None:
        return _unknown("graft", 1, {}, "driver", model)
    shape = model.shape
    streamed = 3 * 4 * max((r * c for _, r, c in shape.matrices), default=0)  # base tensor, delta and sum in fp32
    fusion = FUSION_SIZES.get(spec.graft.method, FUSION_SIZES["additive"])  # a fusion added later: streamed at least
    how = f"{spec.graft.method} fusion in the driver, tensor by tensor" + (f", {fusion.note}" if fusion.note else "")
    return StagePlan("graft", 1, {}, "driver", streamed + fusion.extra(shape, spec), 0, 0, how=how)


def evaluation_plan(stage: str, inp: PlanInputs, model: Model, tasks: int, batch: int, new_tokens: int) -> StagePlan:
    """Model tasks that generate: one model each in the placement dtype, its KV cache and a prompt's forward pass."""
    where = inp.where
    ask = where.ray_options()
    if model.shape is None:
        return _unknown(stage, tasks, ask, where.device, model)
    shape, w, prompt = model.shape, inp.weight_bytes, inp.spec.train.max_length
    acts = kv_cache(shape, batch, prompt + new_tokens, w) + forward_activations(shape, batch, prompt, w, logit_positions=1)
    how = f"one model in {where.dtype}; KV cache of {batch} rows × {prompt} + {new_tokens} tokens"
    return _model_task(stage, tasks, ask, where, shape.params * w, acts, how)


def _evaluate(inp: PlanInputs) -> StagePlan:
    ev = inp.spec.evaluate
    return evaluation_plan("evaluate", inp, inp.models.base(), len(inp.spec.skills) + 2, ev.batch_size, ev.max_new_tokens)


def _largest(models: list[Model]) -> Model:
    known = [m for m in models if m.shape is not None]
    return max(known, key=lambda m: m.shape.params) if known else models[0]


def _port(inp: PlanInputs) -> StagePlan:
    """With a reference fine-tune, the train section's training on the largest new base; else patches applied in the driver."""
    spec = inp.spec
    bases = _largest([inp.models.get(t) for t in spec.port.to])
    if spec.port.reference_finetune:
        from pipelines.training.experts import adapter_deepspeed

        tr = spec.train
        return training_plan("port", inp, bases, method=tr.method, deepspeed=adapter_deepspeed(tr), workers=tr.num_workers,
                             cpus_per_worker=tr.cpus_per_worker, max_length=tr.max_length)
    if bases.shape is None:
        return _unknown("port", 1, {}, "driver", bases)
    return StagePlan("port", 1, {}, "driver", 2 * METHOD_SIZES[spec.train.method].delta_bytes(bases.shape, spec.train),
                     how="each patch's deltas and their ported copy in the driver")


def _port_eval(inp: PlanInputs) -> StagePlan:
    spec = inp.spec
    model = _largest([inp.models.base(), *(inp.models.get(t) for t in spec.port.to)])
    tasks = len(spec.skills) * 3 * len(spec.port.to) + 1 + len(spec.port.to)
    return evaluation_plan("port_eval", inp, model, tasks, spec.evaluate.batch_size, spec.evaluate.max_new_tokens)


def _distill(inp: PlanInputs) -> StagePlan:
    ds = inp.spec.distill
    plan = evaluation_plan("distill", inp, inp.models.get(ds.source), ds.actors, ds.batch_size, ds.max_new_tokens)
    return replace(plan, ask={**plan.ask, "num_cpus": float(ds.cpus_per_actor)})


def _concepts(inp: PlanInputs) -> StagePlan:
    """Hidden states of the source and the target, `transplant.shards` tasks each, 64 texts per forward pass."""
    tp, where = inp.spec.transplant, inp.where
    model = _largest([inp.models.get(tp.source), inp.models.get(tp.target)])
    ask = where.ray_options()
    if model.shape is None:
        return _unknown("concepts", 2 * tp.shards, ask, where.device, model)
    w, seq = inp.weight_bytes, inp.spec.train.max_length
    acts = forward_activations(model.shape, 64, seq, w)
    how = f"the larger of source and target in {where.dtype}; forward passes of 64 texts × {seq} tokens"
    return _model_task("concepts", 2 * tp.shards, ask, where, model.shape.params * w, acts, how)


def _transplant(inp: PlanInputs) -> StagePlan:
    spec = inp.spec
    model = inp.models.get(spec.transplant.target)
    layers = len(spec.transplant.target_layers or []) or (model.shape.layers if model.shape else 1)
    return evaluation_plan("transplant", inp, model, layers, spec.evaluate.batch_size, spec.evaluate.max_new_tokens)


def _merge(inp: PlanInputs) -> StagePlan:
    """mergekit on the CPU, one task per merge, streaming tensor by tensor: the base's and both experts' tensors and the result."""
    model = inp.models.base()
    tasks, ask = len(inp.spec.merge_study.merges), {"num_cpus": 1.0, "num_gpus": 0.0}
    if model.shape is None:
        return _unknown("merge", tasks, ask, "cpu", model)
    largest = max((r * c for _, r, c in model.shape.matrices), default=0)
    return StagePlan("merge", tasks, ask, "cpu", 4 * 4 * largest, how="mergekit streams tensors: 3 inputs and the result in fp32")


def _evolve(inp: PlanInputs) -> StagePlan:
    ms, ev = inp.spec.merge_study, inp.spec.evaluate
    return evaluation_plan("evolve", inp, inp.models.base(), ms.evolve.max_concurrent, ev.batch_size, ev.max_new_tokens)


def _merge_study(inp: PlanInputs) -> StagePlan:
    ms, ev = inp.spec.merge_study, inp.spec.evaluate
    tasks = len(ms.merges) + len(ms.grafts) + 4
    return evaluation_plan("merge_study", inp, inp.models.base(), tasks, ev.batch_size, ev.max_new_tokens)


def _model_task(stage: str, tasks: int, ask: dict[str, float], where: Placement, states: int, acts: int, how: str) -> StagePlan:
    """A model task: on cuda its weights are read straight onto the GPU; on the CPU everything is host memory."""
    return StagePlan(stage, tasks, ask, where.device, states, acts, 0, how=how)


def _generic(stage: str, inp: PlanInputs) -> StagePlan:
    """A stage without an estimator: one model task holding the base, one forward pass at `train.max_length`."""
    where, model = inp.where, inp.models.base()
    if model.shape is None:
        return _unknown(stage, 1, where.ray_options(), where.device, model)
    acts = forward_activations(model.shape, 1, inp.spec.train.max_length, inp.weight_bytes)
    return _model_task(stage, 1, where.ray_options(), where, model.shape.params * inp.weight_bytes, acts,
                       "no estimator for this stage: one model task holding the base")


ESTIMATORS: dict[str, Callable[[PlanInputs], StagePlan]] = {
    "testbed": _testbed, "train": _train, "dpo": _dpo, "score": _score, "pack": _pack, "graft": _graft, "evaluate": _evaluate,
    "port": _port, "port_eval": _port_eval, "distill": _distill, "concepts": _concepts, "transplant": _transplant,
    "merge": _merge, "evolve": _evolve, "merge_study": _merge_study,
}


# ---------------------------------------------------------------- the plan, its check and its table


def plan_job(spec: JobSpec, node: Node, recipe: Recipe | None = None, known: Mapping[str, ModelShape] | None = None) -> Plan:
    """The plan of every stage of `spec`'s recipe (or `recipe`) on `node`. `known` gives model shapes outright
    (by `base`, `testbed:NAME` or folder), e.g. built from a config in memory."""
    recipe = recipe or recipe_of(spec.recipe)
    inp = PlanInputs(spec, node, placement(spec), ModelBook(spec, known))
    base = inp.models.base()
    trainable = METHOD_SIZES[spec.train.method].trainable(base.shape, spec.train) if base.shape is not None else None
    stages = [ESTIMATORS[s](inp) if s in ESTIMATORS else _generic(s, inp) for s in recipe.stages]
    return Plan(recipe, node, spec.base, base, trainable, stages)


def on_one_node(p: StagePlan, node: Node) -> int:
    """How many of the stage's workers land on one node: as many as its GPUs (cuda) or cores (cpu) hold, at most all."""
    if p.device == "driver" or p.tasks == 0:
        return 1
    share = float(p.ask.get("num_gpus", 0))
    slots = node.gpus / share if share else node.cpus / max(float(p.ask.get("num_cpus", 1)), 1e-9)
    return max(1, min(p.tasks, math.floor(slots + 1e-9)))


def node_ram(p: StagePlan, node: Node) -> int:
    """Host memory the stage needs on one node: each co-located worker's host share (its whole peak off the GPU)."""
    per_worker = p.host if p.device == "cuda" else p.peak + p.host
    return per_worker * on_one_node(p, node)


def stage_problem(p: StagePlan, node: Node) -> str | None:
    """Why stage `p` cannot fit `node`, as the tail of one line (what it needs, what the node has), or None."""
    if p.unknown:
        return None
    share = float(p.ask.get("num_gpus", 0))
    if p.device == "cuda":
        if node.gpus == 0:
            return "needs a GPU, the largest node has none"
        limit = node.gpu_gb * GB * min(share, 1.0)
        if p.peak > limit:
            return f"needs {_size(p.peak)} per GPU worker, the largest node's GPUs have {_size(limit)}"
    ram, limit = node_ram(p, node), node.ram_gb * GB
    if ram > limit:
        workers = on_one_node(p, node)
        who = f"{workers} workers × {_size(ram // workers)}" if workers > 1 else "one worker"
        return f"needs {_size(ram)} of RAM on one node ({who}), the largest node has {_size(limit)}"
    return None


def refusal(plan: Plan, source: str) -> str | None:
    """The one line refusing the job for its first stage that cannot fit the largest node, or None when all fit."""
    for p in plan.stages:
        problem = stage_problem(p, plan.node)
        if problem:
            return f"{source}: stage {p.stage!r} does not fit the largest node ({plan.node.describe()}): {problem}"
    return None


def require_fit(spec: JobSpec, recipe: Recipe, source: str, node: Node) -> Plan:
    """The job's plan, or PlanError (one line) when a stage cannot fit `node`: `graft run`'s check before anything runs."""
    plan = plan_job(spec, node, recipe)
    line = refusal(plan, source)
    if line:
        raise PlanError(line)
    return plan


def _size(n: float) -> str:
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def _ask(p: StagePlan) -> str:
    if p.device == "driver":
        return "driver"
    parts = [f"{p.ask.get('num_gpus', 0):g} GPU"] if p.ask.get("num_gpus") else []
    parts.append(f"{p.ask.get('num_cpus', 1):g} CPU")
    return f"{p.tasks} × " + " ".join(parts)


HEADER = f"{'stage':<12} {'tasks × each asks':<20} {'ZeRO':>4} {'states':>10} {'activations':>11} {'peak/worker':>11} " \
         f"{'node RAM':>10}  fits"


def format_plan(plan: Plan, source: str, width: int = TABLE_WIDTH) -> str:
    """The plan as a table of at most `width` columns: per stage what it asks Ray for, its memory per worker (on a GPU
    for cuda stages), the host memory it needs on one node and whether it fits; under it how each was estimated."""
    base = plan.base
    size = (f"{_count(base.shape.params)} params" + (f", {_count(plan.trainable)} trained" if plan.trainable is not None else "")
            if base.shape is not None else base.unknown)
    head = [f"{source}: recipe {plan.recipe.name!r} on the largest node: {plan.node.describe()}",
            f"base {base.shape.name if base.shape is not None else plan.base_name}: {size}", "", HEADER]
    rows, notes = [], []
    for p in plan.stages:
        if p.unknown:
            rows.append(f"{p.stage:<12} {_ask(p):<20} {_zero(p):>4} {'?':>10} {'?':>11} {'?':>11} {'?':>10}  ?")
            notes.append(f"{p.stage}: {p.unknown}")
            continue
        fits = "no" if stage_problem(p, plan.node) else "yes"
        rows.append(f"{p.stage:<12} {_ask(p):<20} {_zero(p):>4} {_size(p.states):>10} {_size(p.activations):>11} "
                    f"{_size(p.peak):>11} {_size(node_ram(p, plan.node)):>10}  {fits}")
        if p.how:
            notes.append(f"{p.stage}: {p.how}")
    wrapped = [line for note in notes for line in textwrap.wrap(note, width, subsequent_indent="    ")]
    return "\n".join([*head, *(r[:width] for r in rows), "", *wrapped])


def _zero(p: StagePlan) -> str:
    return "-" if p.zero_stage is None else str(p.zero_stage)
