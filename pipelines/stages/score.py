"""Stage `score`: per-parameter importance of each skill's expert, fanned out as Ray tasks.

Reads `Base`, `Datasets`, `Experts`; writes `Scores`. One Ray task per (skill, data shard) computes
partial sums of the chosen score (default: the Fisher diagonal) on the skill's expert (the base with its
adapter merged in, or its fine-tuned checkpoint), over the tensors the expert changed (what its SkillPack
can touch: an adapter's target modules), placed as `compute` says (`pipelines.placement`). The driver adds
each shard's partial as it arrives (exact: sums and counts), so it holds one running sum, not every
shard's, and writes `<root>/score/<skill>-<key>/scores.safetensors` and `summary.json` (per tensor: mean,
max and share of the importance mass).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from graft.importance import ImportancePartial, module_summary, save_scores
from pipelines.artifacts import Base, Datasets, Experts, Scores
from pipelines.cache import Ref, content_key
from pipelines.waiting import as_completed
from pipelines.context import RunContext, StageResult
from pipelines.placement import Placement, placement

NAME = "score"
READS = (Base, Datasets, Experts)
WRITES = (Scores,)
SECTIONS = ("score", "train")  # train.max_length: the expert is scored on rows cut as it was trained


@dataclass(frozen=True)
class ScoreRequest:
    """Everything one skill's scores depend on; its content key is the hash of all of it."""

    base: Ref
    expert: Ref | None  # None: the base's own importance
    expert_kind: str
    tokenizer: Ref
    data: Ref
    method: str
    shards: int
    examples: int
    batch_size: int
    max_length: int
    trust_remote_code: bool
    placement: Placement


def score_shard(req: ScoreRequest, shard: int) -> tuple[dict, int]:
    """Partial importance sums of one data shard over the tensors the expert changed (runs as a Ray task)."""
    from transformers import AutoTokenizer

    from graft.data import collated_batches, encode_examples, read_jsonl
    from graft.importance import SCORES
    from graft.experts import Expert
    from graft.lora import load_with_adapter

    where = req.placement
    where.enter()
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    load = where.load_options(req.trust_remote_code)
    if req.expert is None:
        model, keys = load_with_adapter(req.base.path, None, options=load), None
    else:
        expert = Expert(Path(req.expert.path), req.expert_kind)
        model, keys = expert.load(req.base.path, options=load), expert.touches(req.base.path)
    rows = read_jsonl(req.data.path)[:req.examples][shard::req.shards]
    batches = (where.batch(b) for b in collated_batches(encode_examples(tok, rows, req.max_length), tok.pad_token_id, req.batch_size))
    part = SCORES.get(req.method)(model, batches, keys)
    return {k: v.cpu().numpy() for k, v in part.sums.items()}, part.count


def score_shard_on_node(req: ScoreRequest, shard: int) -> tuple[dict, int, str]:
    """`score_shard` plus the id of the Ray node it ran on, so the run records where the fan-out went."""
    import ray

    sums, count = score_shard(req, shard)
    return sums, count, ray.get_runtime_context().get_node_id()


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, sc = ctx.spec, ctx.spec.score
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    result = StageResult(NAME)
    where = placement(spec)
    remote = ray.remote(**where.ray_options())(score_shard_on_node)
    pending: dict[str, list] = {}
    requests = {s.name: ScoreRequest(
        base=base.model, expert=experts[s.name], expert_kind=experts.kind, tokenizer=base.tokenizer, data=data[s.name].train,
        method=sc.method,
        shards=sc.shards, examples=sc.examples, batch_size=sc.batch_size, max_length=spec.train.max_length,
        trust_remote_code=spec.trust_remote_code, placement=where) for s in spec.skills}
    keys = {name: content_key(req) for name, req in requests.items()}

    def submit(skill: str) -> list:
        if skill not in pending:
            pending[skill] = [remote.remote(requests[skill], i) for i in range(sc.shards)]
        return pending[skill]

    for s in spec.skills:  # fan out every skill's shards before waiting on any
        if not ctx.output_path(NAME, s.name, keys[s.name]).is_dir() or NAME in ctx.force:
            submit(s.name)
    for s in spec.skills:
        def build(tmp: Path, run, skill=s.name) -> dict[str, float]:
            total: ImportancePartial | None = None
            nodes = set()
            # the refs live on only in the generator, which drops each once fetched: the driver holds one running sum
            shards = as_completed(dict(enumerate(submit(skill))), f"{NAME}/{skill}", ctx.log, unit="shards")
            del pending[skill]
            for _, (sums, count, node) in shards:
                nodes.add(node)
                part = ImportancePartial({k: torch.from_numpy(np.array(v)) for k, v in sums.items()}, count)
                total = part if total is None else total + part
            scores = total.finalize()
            save_scores(scores, tmp / "scores.safetensors", sc.method, total.count)
            summary = module_summary(scores)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
            run.artifact(tmp / "summary.json")
            top = next(iter(summary.items()))
            run.tags({"graftline.top_tensor": top[0], "graftline.node_ids": ",".join(sorted(nodes))})
            return {"terms": total.count, "shards": sc.shards, "top_tensor_share": top[1]["share"],
                    "total_mass": float(sum(v.sum() for v in scores.values()))}

        ctx.run_item(NAME, s.name, keys[s.name], {"skill": s.name, **sc.model_dump(mode="json")}, build, result)
    result.artifacts.append(Scores({name: Ref(str(result.outputs[name]), keys[name]) for name in keys}))
    return result
