"""Stage `dpo`: each skill's expert, trained by SFT on a source's answers, trained on again with DPO where it still errs.

Reads `Base`, `Datasets` and `Experts`; writes `Experts` (of the same kind: a LoRA adapter trained on from the
SFT one, or a full checkpoint trained on from the SFT checkpoint); uses the `dpo` section, and the `train`
section for the workers, ZeRO stage, precision and LoRA settings.

GraftLLM's optional step after SFT (methods.md §1.1; `graft.preference`). The SFT target answers the skill's
training prompts (the `distill` stage's checked source answers) by greedy generation, and where that is already the
source's answer, by `dpo.samples` sampled answers; fanned out with Ray Data (`map_batches` on `dpo.actors` actors,
each loading the target once). The same actors compute the target's log-probabilities of the source's answer and of
the one it rejects, which are DPO's frozen reference. Each prompt gives at most one pair: chosen the source's answer,
rejected the target's greedy answer where that differs, else its first sampled answer that does. A skill the target
answers exactly as the source does, greedy and in every sample, has nothing to prefer, and is refused by name. The pairs
then train the expert with the DPO loss through the same Ray Train + DeepSpeed loop as `train`
(`pipelines.training.objectives`), every skill in one worker group.
Outputs: `<root>/dpo/<skill>-<key>/`, the expert (as `train` writes it) with `pairs.jsonl` and `dpo.json`.
Training runs `dpo.steps` steps, or fewer where `dpo.epochs` passes over the skill's pairs take fewer (`capped_schedule`).
Logs (child run `dpo/<skill>`): prompts, pairs, pair_fraction, pairs_greedy_wrong, pairs_sampled, steps, final_loss,
train_seconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from graft.data import read_jsonl, write_jsonl
from graft.distill import DistillError
from graft.preference import preference_pairs
from pipelines.artifacts import Base, Datasets, Experts
from pipelines.cache import Ref, content_key
from pipelines.context import Item, RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.spec import DpoSpec, JobSpec, TrainSpec
from pipelines.training.experts import METHODS, dpo_deepspeed
from pipelines.training.trainer import TrainJob, TrainRequest, run_training

NAME = "dpo"
READS = (Base, Datasets, Experts)
WRITES = (Experts,)
SECTIONS = ("dpo", "train")


@dataclass(frozen=True)
class PairsRequest:
    """Everything one skill's preference pairs depend on: the SFT target, the prompts with the source's answers, how
    the target answers and how answers are tokenized."""

    base: Ref
    expert: Ref
    expert_kind: str
    tokenizer: Ref
    prompts: Ref  # the distilled training split: the source's checked answers
    examples: int | None
    max_new_tokens: int
    samples: int
    temperature: float
    seed: int
    max_length: int
    trust_remote_code: bool
    placement: Placement


# how training goes on from each kind of SFT expert: (model to load, training mode, adapter settings)
Continuation = Callable[[Base, Ref, TrainSpec], tuple[Ref, str, dict | None]]
CONTINUE: dict[str, Continuation] = {
    "full": lambda base, expert, tr: (expert, "full", None),
    "lora": lambda base, expert, tr: (base.model, "lora", {**METHODS["lora"].settings(tr), "init": expert}),
}


def problems(spec: JobSpec) -> list[str]:
    """An SFT method DPO cannot go on from."""
    if spec.train.method not in CONTINUE:
        return [f"train.method: {spec.train.method!r} experts cannot be trained on with dpo; use one of {', '.join(CONTINUE)}"]
    return []


def dpo_request(spec: JobSpec, base: Base, expert: Ref, pairs: Ref) -> TrainRequest:
    """The DPO training of one skill's expert: from the SFT expert, on its pairs, with the `dpo` section's schedule."""
    tr, d = spec.train, spec.dpo
    model, mode, adapter = CONTINUE[tr.method](base, expert, tr)
    return TrainRequest(model=model, tokenizer=base.tokenizer, data=pairs, mode=mode, steps=d.steps, batch_size=d.batch_size,
                        seed=tr.seed, deepspeed=dpo_deepspeed(spec), num_workers=tr.num_workers, accelerator=spec.compute.accelerator,
                        threads_per_worker=tr.cpus_per_worker, max_length=tr.max_length, adapter=adapter,
                        trust_remote_code=spec.trust_remote_code, objective="dpo",
                        objective_settings={"beta": d.beta, "nll_weight": d.nll_weight})


class TargetAnswerer:
    """A Ray Data actor: loads the SFT target once, answers prompts (greedy, then sampled where greedy is right), picks
    the answer to reject, and scores it and the source's answer."""

    def __init__(self, req: PairsRequest, batch_size: int) -> None:
        from transformers import AutoTokenizer

        from graft.experts import Expert

        req.placement.enter()
        self.req, self.batch_size = req, batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(req.tokenizer.path, trust_remote_code=req.trust_remote_code)
        self.model = Expert(Path(req.expert.path), req.expert_kind).load(
            req.base.path, options=req.placement.load_options(req.trust_remote_code))

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from graft.evaluation import generate_answers
        from graft.preference import answer_logps, rejected_answers

        req, n = self.req, self.req.samples
        prompts, chosen = [str(p) for p in batch["prompt"]], [str(a) for a in batch["answer"]]
        greedy = generate_answers(self.model, self.tokenizer, prompts, req.max_new_tokens, self.batch_size)
        right = [i for i, (g, c) in enumerate(zip(greedy, chosen)) if g == c]
        sampled: list[list[str]] = [[] for _ in prompts]
        if right and n:
            torch.manual_seed(req.seed * 1_000_003 + int(batch["index"][0]))  # the same samples for the same batch
            flat = generate_answers(self.model, self.tokenizer, [prompts[i] for i in right], req.max_new_tokens,
                                    max(1, self.batch_size // n), samples=n, temperature=req.temperature)
            for k, i in enumerate(right):
                sampled[i] = flat[k * n:(k + 1) * n]
        rejected = rejected_answers(chosen, greedy, sampled)
        ref_chosen = answer_logps(self.model, self.tokenizer, prompts, chosen, req.max_length, self.batch_size)
        ref_rejected = answer_logps(self.model, self.tokenizer, prompts, rejected, req.max_length, self.batch_size)
        return {"index": batch["index"], "answer": np.array(rejected, dtype=object),
                "greedy_wrong": np.array([g != c for g, c in zip(greedy, chosen)]),
                "ref_chosen": np.array(ref_chosen), "ref_rejected": np.array(ref_rejected)}


def capped_schedule(d: DpoSpec, pairs: int, workers: int) -> tuple[int, int]:
    """(steps, warmup steps) of a skill's DPO training: `dpo.steps`, or fewer where `dpo.epochs` passes over its `pairs`
    (at `dpo.batch_size` pairs per worker) take fewer; a capped schedule warms up over at most a tenth of its steps."""
    steps = d.steps if d.epochs is None else min(d.steps, max(1, math.ceil(d.epochs * pairs / (d.batch_size * workers))))
    if steps == d.steps:
        return d.steps, d.warmup_steps
    return steps, min(d.warmup_steps, max(1, steps // 10))


def make_pairs(req: PairsRequest, d: DpoSpec, skill: str) -> tuple[list[dict], dict[str, float]]:
    """The skill's pairs (each with its reference log-probs), and how many prompts the target answered and how many
    pairs reject its greedy answer or a sampled one."""
    import ray.data

    rows = read_jsonl(req.prompts.path)[:d.examples]
    items = [{"index": i, "prompt": r["prompt"], "answer": r["answer"]} for i, r in enumerate(rows)]
    answered = ray.data.from_items(items).map_batches(
        TargetAnswerer, batch_size=d.generate_batch_size, compute=ray.data.ActorPoolStrategy(size=d.actors),
        num_cpus=d.cpus_per_actor, num_gpus=req.placement.num_gpus,
        fn_constructor_kwargs={"req": req, "batch_size": d.generate_batch_size}).take_all()
    got = sorted(answered, key=lambda r: int(r["index"]))
    pairs = preference_pairs(rows, [str(r["answer"]) for r in got],
                             [{"ref_chosen": float(r["ref_chosen"]), "ref_rejected": float(r["ref_rejected"]),
                               "greedy_wrong": bool(r["greedy_wrong"])} for r in got])
    if not pairs:
        raise DistillError(f"dpo/{skill}: the trained target answers all {len(rows)} prompts as the source does, greedy and in "
                           f"{d.samples} samples each, so there is nothing to prefer; leave the dpo stage out of this job's recipe")
    greedy = sum(p["greedy_wrong"] for p in pairs)
    return pairs, {"prompts": len(rows), "pairs": len(pairs), "pair_fraction": len(pairs) / len(rows),
                   "pairs_greedy_wrong": greedy, "pairs_sampled": len(pairs) - greedy}


def run(ctx: RunContext) -> StageResult:
    spec, d = ctx.spec, ctx.spec.dpo
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    result = StageResult(NAME)
    where = replace(placement(spec), threads=d.cpus_per_actor)
    pairs_reqs = {s.name: PairsRequest(base.model, experts[s.name], experts.kind, base.tokenizer, data[s.name].train, d.examples,
                                       d.max_new_tokens, d.samples, d.temperature, spec.train.seed, spec.train.max_length,
                                       spec.trust_remote_code, where) for s in spec.skills}
    pairs_keys = {name: content_key(req) for name, req in pairs_reqs.items()}
    # the pairs file's path, and the steps `dpo.epochs` allows, are only known while building; both follow from the pairs
    # request, so the key of (the uncapped request, the epochs) is final now
    reqs = {name: dpo_request(spec, base, experts[name], Ref("", pairs_keys[name])) for name in pairs_reqs}
    keys = {name: content_key({"request": req.key(), "epochs": d.epochs}) for name, req in reqs.items()}
    params = {**{f"dpo.{k}": v for k, v in d.model_dump(mode="json").items()}, "train.method": spec.train.method}
    items = [Item(name, keys[name], {"skill": name, **params, "deepspeed.zero_stage": req.zero_stage}) for name, req in reqs.items()]

    def build(todo) -> dict[str, dict[str, float]]:
        jobs, counts = [], {}
        for name, (tmp, run) in todo.items():
            pairs, counts[name] = make_pairs(pairs_reqs[name], d, name)
            tmp.mkdir(parents=True, exist_ok=True)
            write_jsonl(tmp / "pairs.jsonl", pairs)
            c = counts[name]
            steps, warmup = capped_schedule(d, c["pairs"], spec.train.num_workers)
            c["steps"] = steps
            capped = f" (capped from {d.steps}: {d.epochs:g} epochs)" if steps < d.steps else ""
            ctx.log(f"  dpo/{name}: {c['pairs']} pairs from {c['prompts']} prompts ({c['pairs_greedy_wrong']} where the target's "
                    f"greedy answer is not the source's, {c['pairs_sampled']} from its samples), β={d.beta}, "
                    f"NLL weight {d.nll_weight}, {steps} steps{capped}")
            req = replace(reqs[name], data=Ref(str(tmp / "pairs.jsonl"), pairs_keys[name]), steps=steps,
                          deepspeed=dpo_deepspeed(spec, schedule=(steps, warmup)))
            jobs.append(TrainJob(req, str(tmp), tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id,
                                 system_metrics_every_s=spec.tracking.system_metrics_every_s))
        run_training(jobs, ctx.root / "ray_train", "dpo-" + "-".join(todo), checkpoint_every=spec.train.checkpoint_every,
                     max_failures=spec.train.max_failures, log=ctx.log, names={str(tmp): f"dpo/{n}" for n, (tmp, _) in todo.items()})
        method = METHODS[spec.train.method]
        metrics = {}
        for name, (tmp, run) in todo.items():
            method.check(tmp, base.model.path, trust_remote_code=spec.trust_remote_code)
            info = json.loads((tmp / "train_info.json").read_text())
            summary = {**counts[name], "beta": d.beta, "nll_weight": d.nll_weight, "final_loss": info["final_loss"]}
            (tmp / "dpo.json").write_text(json.dumps(summary, indent=1))
            run.artifact(tmp / "dpo.json")
            metrics[name] = {**counts[name], "final_loss": info["final_loss"], "train_seconds": info["train_seconds"]}
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    result.artifacts.append(Experts({name: Ref(str(path), keys[name]) for name, path in paths.items()}, kind=experts.kind))
    return result
