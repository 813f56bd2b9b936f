"""Stage `graft`: the driver applies every skill's SkillPack to the base and writes an HF checkpoint.

Output: `<root>/graft/grafted-<key>/`, a checkpoint folder (safetensors, config, tokenizer) that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load, plus `graft.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.grafting import graft_into
from graft.skillpack import SkillPack
from pipelines.cache import content_key
from pipelines.context import RunContext, StageResult

NAME = "graft"


def run(ctx: RunContext) -> StageResult:
    spec = ctx.spec
    prep, packed = ctx.results["testbed"].info, ctx.results["pack"]
    result = StageResult(NAME)
    names = [s.name for s in spec.skills]
    key = content_key(prep["base_key"], [packed.keys[n] for n in names], spec.graft)

    def build(tmp: Path, run) -> dict[str, float]:
        packs = [SkillPack.load(packed.outputs[n]) for n in names]
        report = graft_into(prep["base"], packs, tmp, scales=[spec.graft.scale] * len(packs))
        (tmp / "graft.json").write_text(json.dumps(report, indent=1))
        run.artifact(tmp / "graft.json")
        return {"skills": len(packs)}

    out = ctx.run_item(NAME, "grafted", key, {"skills": names, **spec.graft.model_dump(mode="json")}, build, result)
    ctx.parent.tags({"graftline.grafted_checkpoint": str(out)})
    return result
