"""Stage `graft`: the driver fuses every skill's SkillPack into the base and writes an HF checkpoint.

The fusion method comes from `graft.method` ('additive', or 'protected': importance-protected, using
the score stage's maps so later skills do not overwrite what earlier ones need).

Output: `<root>/graft/grafted-<key>/`, a checkpoint folder (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load, plus `graft.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.fusion import fuse_into
from graft.importance import load_scores
from graft.skillpack import SkillPack
from pipelines.cache import content_key
from pipelines.context import RunContext, StageResult

NAME = "graft"


def run(ctx: RunContext) -> StageResult:
    spec = ctx.spec
    prep, packed, scored = ctx.results["testbed"].info, ctx.results["pack"], ctx.results["score"]
    result = StageResult(NAME)
    names = [s.name for s in spec.skills]
    needs_scores = spec.graft.method != "additive"
    key = content_key(prep["base_key"], [packed.keys[n] for n in names], needs_scores and [scored.keys[n] for n in names],
                      spec.graft)

    def build(tmp: Path, run) -> dict[str, float]:
        packs = [SkillPack.load(packed.outputs[n]) for n in names]
        scores = [load_scores(scored.outputs[n] / "scores.safetensors") if needs_scores else None for n in names]
        report = fuse_into(prep["base"], packs, scores, tmp, spec.graft.method, spec.graft.scale, spec.graft.protect_fraction)
        (tmp / "graft.json").write_text(json.dumps(report, indent=1))
        run.artifact(tmp / "graft.json")
        return {"skills": len(packs)}

    out = ctx.run_item(NAME, "grafted", key, {"skills": names, **spec.graft.model_dump(mode="json")}, build, result)
    ctx.parent.tags({"graftline.grafted_checkpoint": str(out)})
    return result
