"""Stage `graft`: the driver fuses every skill's SkillPack into the base and writes an HF checkpoint.

Reads `Base`, `Datasets` (router prompts), `Packs`, `Scores` ('protected'); writes `Grafted`.

The fusion method comes from `graft.method` (graft.fusion.FUSIONS): 'additive'; 'protected'
(importance-protected, using the score stage's maps so later skills do not overwrite what earlier ones
need); or 'routed' (a router trained on each skill's training prompts and on `graft.router_none`
prompts sends each prompt to one pack, or to none).

Output: `<root>/graft/grafted-<key>/`, a checkpoint folder (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load — or, for 'routed',
a routed-model folder that `graft.routing.RoutedModel.load` loads. The fusion report (packs, method, base
drift) goes to the stage's MLflow run as `graft.json`; the folder itself holds only what its checks cover.

With `tracking.register_model` (the default) the output, built or reused, is then a version of the MLflow
model `tracking.model_name` (default `<job>-grafted`): a logged model whose weights are hard links to the
output's files (`pipelines.logged_model`), servable with `mlflow.pyfunc.load_model("models:/NAME/N")`. The
same content key keeps its version; the graft run and the job's run are tagged `graftline.registered_model`
(`NAME/N`) and `graftline.logged_model_id`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from graft.data import read_jsonl
from graft.fusion import FusionSettings, fuse_into
from graft.importance import load_scores
from graft.model_checks import check_checkpoint
from graft.routing import is_routed, read_routed_manifest
from graft.signing import verify_folder
from graft.skillpack import SkillPack
from pipelines.artifacts import Base, Datasets, Grafted, Packs, Scores
from pipelines.cache import Ref, content_key
from pipelines.context import RunContext, StageResult
from pipelines.spec import GraftSpec
from pipelines.inputs import digest_cache, file_ref
from pipelines.logged_model import MODEL_ID_TAG, REGISTERED_TAG, GraftedModel, NotServable, default_model_name, register_grafted
from pipelines.tracking import RunHandle, write_json_artifact

NAME = "graft"
READS = (Base, Datasets, Packs, Scores)
WRITES = (Grafted,)
SECTIONS = ("graft",)


@dataclass(frozen=True)
class GraftRequest:
    """Everything the grafted model depends on; its content key is the hash of all of it."""

    base: Ref
    tokenizer: Ref
    packs: tuple[tuple[str, Ref], ...]
    scores: tuple[Ref, ...] | None  # 'protected' only
    router_prompts: tuple[tuple[str, Ref], ...]  # 'routed' only: each skill's, and "none"
    settings: GraftSpec  # `require_signature` replaced by `verifier`
    verifier: Ref | None
    seed: int


def run(ctx: RunContext) -> StageResult:
    spec, g = ctx.spec, ctx.spec.graft
    base, data, packs, scored = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Packs), ctx.board.get(Scores)
    result = StageResult(NAME)
    names = [s.name for s in spec.skills]
    prompts: dict[str, Ref] = {}
    if g.method == "routed":
        prompts = {n: data[n].train for n in names}
        prompts["none"] = data[g.router_none].train if g.router_none in data else file_ref(g.router_none)
    scores = tuple(Ref(str(Path(scored[n].path) / "scores.safetensors"), scored[n].key) for n in names)
    req = GraftRequest(
        base=base.model, tokenizer=base.tokenizer, packs=tuple((n, packs[n]) for n in names),
        scores=scores if g.method == "protected" else None,
        router_prompts=tuple(prompts.items()), settings=g.model_copy(update={"require_signature": None}),
        verifier=file_ref(g.require_signature) if g.require_signature else None, seed=spec.seed)

    def build(tmp: Path, run) -> dict[str, float]:
        for _, pack in req.packs:
            if req.verifier is not None:
                verify_folder(pack.path, req.verifier.path)
        packs = [SkillPack.load(p.path) for _, p in req.packs]
        scores = [load_scores(r.path) for r in req.scores] if req.scores else [None] * len(packs)
        settings = FusionSettings(scale=g.scale, protect_fraction=g.protect_fraction, seed=req.seed, tokenizer=req.tokenizer.path,
                                  router_prompts={c: _prompts(r.path, g.router_examples, req.seed) for c, r in req.router_prompts},
                                  digest_cache=digest_cache(ctx.spec))
        report = fuse_into(req.base.path, packs, scores, tmp, g.method, settings)
        if is_routed(tmp):
            read_routed_manifest(tmp)  # as a reader will see it: schema, hash, checksums
        else:
            check_checkpoint(tmp, req.base.path, trust_remote_code=spec.trust_remote_code)
        write_json_artifact(run, report, "graft.json")
        return {"skills": len(packs)}

    key = content_key(req)
    params = {"skills": names, **spec.graft.model_dump(mode="json")}
    out = ctx.run_item(NAME, "grafted", key, params, build, result)
    ctx.parent.tags({"graftline.grafted_checkpoint": str(out)})
    if spec.tracking.register_model:
        grafted = GraftedModel(out, key, Path(req.tokenizer.path), Path(req.base.path), spec.trust_remote_code)
        _register(ctx, grafted, params, result)
    result.artifacts.append(Grafted(Ref(str(out), key)))
    return result


def _register(ctx: RunContext, grafted: GraftedModel, params: dict, result: StageResult) -> None:
    """Make the output a version of the job's registered model (or find the one its key already has), and tag the
    graft run and the job's run with it. A graft MLflow cannot serve is left unregistered, with a warning."""
    run = RunHandle(ctx.tracker.client, result.runs["grafted"])
    name = ctx.spec.tracking.model_name or default_model_name(ctx.spec.name)
    try:
        reg = register_grafted(ctx.tracker.client, ctx.tracker.experiment_id, grafted, name, run.run_id, params, ctx.log)
    except NotServable as e:
        result.warnings.append(f"not registered as MLflow model {name!r}: {e}")
        return
    tags = {REGISTERED_TAG: f"{reg.name}/{reg.version}", MODEL_ID_TAG: reg.model_id}
    run.tags(tags)
    ctx.parent.tags(tags)
    ctx.log(f"  {NAME}: {'already registered as' if reg.reused else 'registered'} {reg.name} version {reg.version} ({reg.uri})")


def _prompts(path: str, n: int, seed: int) -> list[str]:
    """`n` prompts drawn (seeded) from a prompt/answer JSONL file."""
    rows = read_jsonl(path)
    random.Random(seed).shuffle(rows)
    return [r["prompt"] for r in rows[:n]]
