"""Stage `port`: each skill's patch carried to newer versions of the base with no training (PortLLM, methods.md §2).

Reads `Base`, `Datasets`, `Experts`, `Models`; writes `Ported`; uses the `port` section (and `train`,
whose settings the reference fine-tunes reuse).

For each skill and each new base in `port.to` (`testbed:base-v2` … or checkpoint folders), the patch
(the skill's expert, trained on the job's base) is checked to fit the new base — every module it
changes, with its shape; one line naming the module otherwise — and the base's drift under the patch
is measured per module (`graft.port.base_drift`). With `port.reference_finetune`, the same expert is
also trained on each new base (the train section's settings; all in one Ray Train run) and the update
gap ‖Δ' − Δ‖_F / ‖Δ‖_F and the cosine are reported per module: the paper's lemma, measured.
Outputs: `<root>/port/<skill>@<base>-<key>/port.json`, and the reference experts as
`<root>/port/reference-<skill>@<base>-<key>/`.
Logs (child runs `port/<skill>@<base>`): mean and max drift, and with a reference the mean gap and cosine.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from graft.experts import Expert
from graft.port import base_drift, check_fits, update_gap
from pipelines.artifacts import Base, Checkpoint, Datasets, Experts, Models, Ported
from pipelines.cache import Ref, content_key
from pipelines.context import Item, RunContext, StageResult
from pipelines.inputs import TESTBED, named_model, named_model_problems
from pipelines.spec import JobSpec
from pipelines.training.experts import METHODS, expert_requests
from pipelines.training.trainer import TrainJob, TrainRequest, run_training

NAME = "port"
READS = (Base, Datasets, Experts, Models)
WRITES = (Ported,)
SECTIONS = ("port", "train")


@dataclass(frozen=True)
class PortRequest:
    """What one skill's port to one new base depends on; its content key is the hash of all of it."""

    old_base: Ref
    new_base: Ref
    patch: Ref
    kind: str
    reference: Ref | None  # the same expert trained on the new base


def problems(spec: JobSpec) -> list[str]:
    """New bases the job does not build (testbed names) or that are not there (folders)."""
    return [line for target in spec.port.to for line in named_model_problems("port.to", target, spec)]


def base_name(target: str) -> str:
    """A new base's short name: the testbed model's, or the folder's."""
    return target.removeprefix(TESTBED) if target.startswith(TESTBED) else Path(target).name


def reference_requests(spec: JobSpec, bases: dict[str, Checkpoint], data: Datasets) -> dict[str, TrainRequest]:
    """The job's own expert requests, each started from a new base instead: one per skill and new base."""
    out = {}
    for name, checkpoint in bases.items():
        for skill, req in expert_requests(spec, Base(checkpoint.model, checkpoint.tokenizer), data).items():
            out[Ported.pair(skill, name)] = req
    return out


def run(ctx: RunContext) -> StageResult:
    spec = ctx.spec
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    models = ctx.board.get(Models)
    bases = {base_name(target): named_model(target, models) for target in spec.port.to}
    result = StageResult(NAME)
    references: dict[str, Ref] = {}
    if spec.port.reference_finetune:
        references = _reference_finetunes(ctx, reference_requests(spec, bases, data), result)
    reqs = {Ported.pair(s.name, name): PortRequest(base.model, checkpoint.model, experts[s.name], experts.kind,
                                                  references.get(Ported.pair(s.name, name)))
            for s in spec.skills for name, checkpoint in bases.items()}
    by_pair = {}
    for pair, req in reqs.items():
        def build(tmp: Path, run, req=req) -> dict[str, float]:
            t0 = time.time()
            deltas = Expert(Path(req.patch.path), req.kind).deltas(req.old_base.path)
            check_fits(deltas, req.new_base.path)
            report: dict = {"old_base": req.old_base.path, "new_base": req.new_base.path, "patch": req.patch.path, "kind": req.kind,
                            "drift": base_drift(req.old_base.path, req.new_base.path, list(deltas))}
            metrics = {"drift_mean": sum(report["drift"].values()) / len(report["drift"]), "drift_max": max(report["drift"].values())}
            if req.reference is not None:
                gap = update_gap(deltas, Expert(Path(req.reference.path), req.kind).deltas(req.new_base.path))
                report["update_gap"] = gap
                metrics |= {"gap_mean": sum(g["relative_gap"] for g in gap.values()) / len(gap),
                            "cosine_mean": sum(g["cosine"] for g in gap.values()) / len(gap)}
            report["port_seconds"] = metrics["port_seconds"] = time.time() - t0
            (tmp / "port.json").write_text(json.dumps(report, indent=1))
            run.artifact(tmp / "port.json")
            return metrics

        key = content_key(req)
        params = {"pair": pair, "kind": req.kind, "new_base": req.new_base.path, "reference": bool(req.reference)}
        by_pair[pair] = Ref(str(ctx.run_item(NAME, pair, key, params, build, result)), key)
    result.artifacts.append(Ported(by_pair, bases, references))
    return result


def _reference_finetunes(ctx: RunContext, reqs: dict[str, TrainRequest], result: StageResult) -> dict[str, Ref]:
    """The same expert trained on every new base, all in one Ray Train run; each checked before it is committed."""
    spec, tr = ctx.spec, ctx.spec.train
    method = METHODS[tr.method]
    items = [Item(f"reference-{pair}", req.key(), {"pair": pair, "deepspeed.zero_stage": req.zero_stage}) for pair, req in reqs.items()]

    def build(todo) -> dict[str, dict[str, float]]:
        jobs = []
        for item, (tmp, run) in todo.items():
            req = reqs[item.removeprefix("reference-")]
            method.precheck(req.model.path, tr, spec.trust_remote_code)
            jobs.append(TrainJob(req, str(tmp), tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id,
                                 system_metrics_every_s=ctx.spec.tracking.system_metrics_every_s))
            ctx.log(f"  port/{item}: {method.describe(tr)} on the new base, {req.steps} steps")
        run_training(jobs, ctx.root / "ray_train", "port-" + "-".join(sorted(todo)).replace("@", "-at-"),
                     checkpoint_every=tr.checkpoint_every, max_failures=tr.max_failures, log=ctx.log,
                     names={str(tmp): f"port/{n}" for n, (tmp, _) in todo.items()})
        metrics = {}
        for item, (tmp, _) in todo.items():
            method.check(tmp, reqs[item.removeprefix("reference-")].model.path, trust_remote_code=spec.trust_remote_code)
            info = json.loads((tmp / "train_info.json").read_text())
            metrics[item] = {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"]}
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    return {pair: Ref(str(paths[f"reference-{pair}"]), req.key()) for pair, req in reqs.items()}
