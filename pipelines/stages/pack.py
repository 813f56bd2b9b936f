"""Stage `pack`: one SkillPack per skill from its expert and its importance scores.

The expert's deltas (an adapter's low-rank ones, or a full fine-tune's dense ones against the base,
`graft.experts`) are compressed module by module (graft.skillpack); each tensor's
share of the skill's importance mass goes into the manifest, and tensors whose share is below
`pack.min_importance_share` are left out of the pack. With `pack.budget` the pack holds at most that
fraction of the bf16 delta's bytes, its ranks allocated by `pack.allocation` (the importance scores
above make it importance-aware). When the pack is calibration-aware (`pack.quantizer: gptq`,
`pack.weighted_svd` or `pack.tune_steps`), the expert runs on `calibration_examples` of the skill's
training rows plus the replayed share of `train.replay_data` (the mix it was trained on): each
layer's input second moment goes to the compression (graft.calibration), and with `pack.tune_steps`
the pack's quantization grids are then fitted to the expert's answers on the same rows
(graft.grid_tuning; same bytes). Output: `<root>/pack/<skill>-<key>/`. What a pack could not do as
asked (a matrix GPTQ rounded to nearest instead: its manifest's `warnings`) becomes a warning of the
stage, prefixed with the skill, and `gptq_fallbacks` counts those matrices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from graft.data import labelled_batches, read_jsonl, replay_mix
from graft.expert_packing import pack_expert
from graft.importance import load_scores, module_summary
from graft.experts import Expert
from graft.signing import sign_folder
from graft.skillpack import MANIFEST, SkillPack
from pipelines.artifacts import Base, Datasets, Experts, Packs, Scores
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import Item, RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.spec import PackSpec
from pipelines.inputs import file_ref, replay_ref

NAME = "pack"
READS = (Base, Datasets, Experts, Scores)
WRITES = (Packs,)
SECTIONS = ("pack", "train")  # train.replay_*, max_length: calibration rows are the mix the expert was trained on
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class PackRequest:
    """Everything one skill's SkillPack depends on; its content key is the hash of all of it.

    Calibration inputs (tokenizer, data, replay) are None when the settings need no calibration.
    """

    skill: str
    base: Ref
    expert: Ref
    expert_kind: str
    scores: Ref
    settings: PackSpec  # `sign_key` replaced by `signer`
    signer: Ref | None
    tokenizer: Ref | None
    data: Ref | None
    replay: Ref | None
    replay_fraction: float
    max_length: int
    trust_remote_code: bool
    placement: Placement


def pack_one(req: PackRequest, out: str, job: str) -> dict[str, float]:
    """Pack one skill's expert into the folder `out` (a Ray task, placed as `req.placement` says: on a GPU the
    calibration passes, GPTQ and grid tuning run there) and return the run's metrics."""
    where, pk = req.placement, req.settings
    where.enter()
    tmp = Path(out)
    expert = Expert(Path(req.expert.path), req.expert_kind)
    deltas = expert.deltas(req.base.path)
    scores = load_scores(req.scores.path)
    share = {k: v["share"] for k, v in module_summary(scores).items()}
    kept = {k: d for k, d in deltas.items() if share.get(k, 1.0) >= pk.min_importance_share}
    source = {"expert": req.expert.path, "expert_kind": req.expert_kind, "base": req.base.path, "job": job,
              "importance_share": {k: share.get(k) for k in kept}, "dropped": sorted(set(deltas) - set(kept))}
    batches = None
    if req.data is not None:
        from transformers import AutoTokenizer

        rows = _calibration_rows(req.data.path, req.replay, req.replay_fraction, pk.calibration_examples)
        tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
        batches = [where.batch(b) for b in labelled_batches(tok, rows, req.max_length, CALIBRATION_BATCH)]
    pack = pack_expert(req.skill, req.base.path, expert, kept, pk.settings(), calibration_batches=batches,
                       importance={k: scores[k] for k in kept if k in scores}, source=source, tune_steps=pk.tune_steps,
                       tune_lr=pk.tune_lr, load=where.load_options(req.trust_remote_code))
    tuned = {f"grid_{k}": v for k, v in pack.manifest.get("grid_tuning", {}).items() if k in ("kl_before", "kl_after")}
    pack.write_into(tmp)
    if req.signer is not None:
        sign_folder(tmp, req.signer.path)
    SkillPack.load(tmp)  # the pack as a reader will see it: schema, checksums, stored layout
    m = pack.manifest
    return {"bytes": m["total_bytes"], "bf16_delta_bytes": m["delta_bf16_bytes"],
            "bytes_ratio": m["total_bytes"] / m["delta_bf16_bytes"], "tensors": len(kept),
            "mean_rank": sum(e.get("rank", 0) for e in m["tensors"].values()) / max(1, len(kept)),
            "gptq_fallbacks": sum(1 for e in m["tensors"].values() if e.get("fallback")), **tuned}


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, pk = ctx.spec, ctx.spec.pack
    base, data = ctx.board.get(Base), ctx.board.get(Datasets)
    experts, scored = ctx.board.get(Experts), ctx.board.get(Scores)
    where = placement(spec)
    result = StageResult(NAME)
    requests = {s.name: PackRequest(
        skill=s.name, base=base.model, expert=experts[s.name], expert_kind=experts.kind,
        scores=Ref(str(Path(scored[s.name].path) / "scores.safetensors"), scored[s.name].key),
        settings=pk.model_copy(update={"sign_key": None}),
        signer=file_ref(pk.sign_key) if pk.sign_key else None,
        tokenizer=base.tokenizer if pk.calibrate else None, data=data[s.name].train if pk.calibrate else None,
        replay=replay_ref(data, spec.train.replay_data, spec.train.replay_fraction) if pk.calibrate else None,
        replay_fraction=spec.train.replay_fraction, max_length=spec.train.max_length, trust_remote_code=spec.trust_remote_code,
        placement=where) for s in spec.skills}
    keys = {name: content_key(req) for name, req in requests.items()}
    items = [Item(name, keys[name], {"skill": name, **pk.model_dump(mode="json")}) for name in requests]

    def build(todo) -> dict[str, dict[str, float]]:
        remote = ray.remote(**where.ray_options())(pack_one)
        refs = {name: remote.remote(requests[name], str(tmp), spec.name) for name, (tmp, _) in todo.items()}
        ctx.log(f"  pack: {', '.join(todo)} as {len(refs)} Ray task(s) on {where.device}")
        metrics = gather(refs, NAME, ctx.log, unit="skills")
        for tmp, run in todo.values():
            run.artifact(tmp, "skillpack")
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    for name, path in paths.items():
        result.warnings += [f"{name}: {w}" for w in _pack_warnings(Path(path))]
    result.artifacts.append(Packs({name: Ref(str(result.outputs[name]), key) for name, key in keys.items()}))
    return result


def _pack_warnings(folder: Path) -> list[str]:
    """The `warnings` of the pack in `folder`, built now or reused (written before packs had them: none)."""
    return json.loads((folder / MANIFEST).read_text()).get("warnings", [])


def _calibration_rows(data: str, replay: Ref | None, replay_fraction: float, examples: int) -> list[dict[str, str]]:
    """The first `examples` training rows of the skill, plus replay rows in the share training used."""
    rows = read_jsonl(data)[:examples]
    return replay_mix(rows, read_jsonl(replay.path), replay_fraction) if replay is not None else rows
