"""Stage `concepts`: the hidden states a concept transplant is fitted from, taken in both models.

Reads `Datasets` and `Models`; writes `Concepts`; uses the `transplant` section.
ConTrans's first step (methods.md §5, `graft.transplant`): the source (`transplant.source`, e.g.
`testbed:aligned-small`) runs on the concept skill's positive/negative pairs, and both the source and the
target (`transplant.target`) on the same `general` prompts (and, with `transplant.map_on_pairs`, on the pairs'
texts too: the map then sees the concept's direction); every decoder layer's output at each text's last token is
kept. The extraction is a Ray fan-out: `transplant.shards` tasks per model over shards of
the texts, each loading its model once. The driver reads the pairs first and refuses an empty or one-sided
set before anything is loaded. Output: `<root>/concepts/concepts-<key>/concepts.safetensors`
(`source_vectors` (source layers, source width): the concept vector at every source layer;
`source_states`, `target_states` (layers, prompts, width): the shared prompts' states) and `concepts.json`
(counts, widths, depths, the vector norm per layer).
Logs (child run `concepts/concepts`): pairs, prompts, both depths and widths.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.artifacts import Checkpoint, Concepts, Datasets, Models
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.inputs import named_model, named_model_problems
from pipelines.spec import JobSpec

NAME = "concepts"
READS = (Datasets, Models)
WRITES = (Concepts,)
SECTIONS = ("transplant",)


@dataclass(frozen=True)
class ConceptsRequest:
    """Everything the extracted states depend on; its content key is the hash of all of it."""

    source: Checkpoint
    target: Checkpoint
    pairs: Ref  # the concept skill's training split
    prompts: Ref  # the shared ordinary prompts (`general`'s training split)
    n_pairs: int
    n_prompts: int
    map_on_pairs: bool
    vector: str
    shards: int
    trust_remote_code: bool
    placement: Placement


def problems(spec: JobSpec) -> list[str]:
    """A testbed source or target the job does not build, a folder that is not there, or a concept skill the job lacks."""
    tp = spec.transplant
    out = named_model_problems("transplant.source", tp.source, spec) + named_model_problems("transplant.target", tp.target, spec)
    names = [s.name for s in spec.skills]
    if tp.concept is not None and tp.concept not in names:
        out.append(f"transplant.concept: {tp.concept!r} is not one of the job's skills ({', '.join(names)})")
    if tp.general != "general" and tp.general not in names:
        out.append(f"transplant.general: {tp.general!r} is neither 'general' (the testbed's) nor one of the job's skills "
                   f"({', '.join(names)})")
    return out


def shard_states(model: Checkpoint, texts: list[list[str]], trust_remote_code: bool, where: Placement) -> list:
    """Last-token states of each text list, from one load of `model` placed as `where` says (a Ray task)."""
    from transformers import AutoTokenizer

    from graft.loading import load_causal_lm
    from graft.transplant import last_token_states

    where.enter()
    net = load_causal_lm(model.model.path, where.load_options(trust_remote_code)).eval()
    tok = AutoTokenizer.from_pretrained(model.tokenizer.path, trust_remote_code=trust_remote_code)
    return [last_token_states(net, tok, t) if t else None for t in texts]


def _shards(texts: list[str], n: int) -> list[list[str]]:
    return [texts[i::n] for i in range(n)]


def _unshard(parts: list, n_total: int):
    """Undo `_shards`: (layers, n, width) in the original order from round-robin shards."""
    import torch

    layers, width = parts[0].shape[0], parts[0].shape[2]
    out = torch.empty(layers, n_total, width)
    for i, part in enumerate(parts):
        out[:, i::len(parts)] = part
    return out


def run(ctx: RunContext) -> StageResult:
    import ray
    from safetensors.torch import save_file

    from graft.data import read_jsonl
    from graft.transplant import TransplantError, concept_vectors, pair_texts, with_pairs

    spec, tp = ctx.spec, ctx.spec.transplant
    data, models = ctx.board.get(Datasets), ctx.board.get(Models)
    concept = tp.concept or spec.skills[0].name
    req = ConceptsRequest(named_model(tp.source, models), named_model(tp.target, models), data[concept].train,
                          data[tp.general].train, tp.pairs, tp.prompts, tp.map_on_pairs, tp.vector, tp.shards,
                          spec.trust_remote_code, placement(spec))
    result = StageResult(NAME)

    def build(tmp: Path, run) -> dict[str, float]:
        pos, neg = pair_texts(read_jsonl(req.pairs.path, fields=())[:req.n_pairs], req.pairs.path)
        prompts = [r["prompt"] for r in read_jsonl(req.prompts.path, fields=("prompt",))[:req.n_prompts]]
        if len(prompts) < 5:
            raise TransplantError(f"{req.prompts.path}: {len(prompts)} shared prompts; the affine map needs at least 5")
        n = min(req.shards, len(pos), len(prompts))
        remote = ray.remote(**req.placement.ray_options())(shard_states)
        src = [remote.remote(req.source, [p, q, g], req.trust_remote_code, req.placement)
               for p, q, g in zip(_shards(pos, n), _shards(neg, n), _shards(prompts, n))]
        tgt = [remote.remote(req.target, [p, q, g] if req.map_on_pairs else [[], [], g], req.trust_remote_code, req.placement)
               for p, q, g in zip(_shards(pos, n), _shards(neg, n), _shards(prompts, n))]
        states = gather({**{f"source shard {i}": r for i, r in enumerate(src)}, **{f"target shard {i}": r for i, r in enumerate(tgt)}},
                        NAME, ctx.log, unit="shards")
        src_out, tgt_out = list(states.values())[:len(src)], list(states.values())[len(src):]
        positive = _unshard([o[0] for o in src_out], len(pos))
        negative = _unshard([o[1] for o in src_out], len(neg))
        source_states = _unshard([o[2] for o in src_out], len(prompts))
        target_states = _unshard([o[2] for o in tgt_out], len(prompts))
        vectors = concept_vectors(positive, negative, req.vector)
        if req.map_on_pairs:
            source_states = with_pairs(source_states, positive, negative)
            target_states = with_pairs(target_states, _unshard([o[0] for o in tgt_out], len(pos)),
                                       _unshard([o[1] for o in tgt_out], len(neg)))
        save_file({"source_vectors": vectors.contiguous(), "source_states": source_states.contiguous(),
                   "target_states": target_states.contiguous()}, str(tmp / "concepts.safetensors"))
        info = {"pairs": len(pos), "prompts": len(prompts), "shared_texts": source_states.shape[1],
                "source_layers": vectors.shape[0], "source_width": vectors.shape[1],
                "target_layers": target_states.shape[0], "target_width": target_states.shape[2], "vector": req.vector,
                "vector_norm": [round(float(v.norm()), 4) for v in vectors]}
        (tmp / "concepts.json").write_text(json.dumps(info, indent=1))
        return {k: float(v) for k, v in info.items() if isinstance(v, int)}

    key = content_key(req)
    out = ctx.run_item(NAME, "concepts", key, {"source": tp.source, "target": tp.target, "concept": concept,
                                                "pairs": tp.pairs, "prompts": tp.prompts, "vector": tp.vector}, build, result)
    result.artifacts.append(Concepts(Ref(str(out), key), req.source, req.target))
    return result
