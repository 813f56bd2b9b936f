"""Stage `graft`: the driver fuses every skill's SkillPack into the base and writes an HF checkpoint.

The fusion method comes from `graft.method` (graft.fusion.FUSIONS): 'additive'; 'protected'
(importance-protected, using the score stage's maps so later skills do not overwrite what earlier ones
need); or 'routed' (a router trained on each skill's training prompts and on `graft.router_none`
prompts sends each prompt to one pack, or to none).

Output: `<root>/graft/grafted-<key>/`, a checkpoint folder (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load — or, for 'routed',
a routed-model folder that `graft.routing.RoutedModel.load` loads — plus `graft.json`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from graft.data import read_jsonl
from graft.fusion import FusionSettings, fuse_into
from graft.importance import load_scores
from graft.skillpack import SkillPack
from pipelines.cache import content_key, file_digest
from pipelines.context import RunContext, StageResult

NAME = "graft"


def run(ctx: RunContext) -> StageResult:
    spec = ctx.spec
    prep, packed, scored = ctx.results["testbed"].info, ctx.results["pack"], ctx.results["score"]
    result = StageResult(NAME)
    names = [s.name for s in spec.skills]
    g = spec.graft
    needs_scores = g.method == "protected"
    router_files = {n: prep["data"][n]["train"] for n in names} if g.method == "routed" else {}
    if router_files:
        router_files["none"] = prep["data"][g.router_none]["train"] if g.router_none in prep["data"] else str(Path(g.router_none).resolve())
    key = content_key(prep["base_key"], [packed.keys[n] for n in names], needs_scores and [scored.keys[n] for n in names],
                      router_files and [prep["data"][n]["key"] for n in names],
                      router_files and g.router_none not in prep["data"] and file_digest(router_files["none"]), g)

    def build(tmp: Path, run) -> dict[str, float]:
        packs = [SkillPack.load(packed.outputs[n]) for n in names]
        scores = [load_scores(scored.outputs[n] / "scores.safetensors") if needs_scores else None for n in names]
        settings = FusionSettings(scale=g.scale, protect_fraction=g.protect_fraction, seed=spec.seed, tokenizer=prep["tokenizer"],
                                  router_prompts={c: _prompts(f, g.router_examples, spec.seed) for c, f in router_files.items()})
        report = fuse_into(prep["base"], packs, scores, tmp, g.method, settings)
        (tmp / "graft.json").write_text(json.dumps(report, indent=1))
        run.artifact(tmp / "graft.json")
        return {"skills": len(packs)}

    out = ctx.run_item(NAME, "grafted", key, {"skills": names, **spec.graft.model_dump(mode="json")}, build, result)
    ctx.parent.tags({"graftline.grafted_checkpoint": str(out)})
    return result


def _prompts(path: str, n: int, seed: int) -> list[str]:
    """`n` prompts drawn (seeded) from a prompt/answer JSONL file."""
    rows = read_jsonl(path)
    random.Random(seed).shuffle(rows)
    return [r["prompt"] for r in rows[:n]]
