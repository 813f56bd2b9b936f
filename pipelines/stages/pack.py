"""Stage `pack`: one SkillPack per skill from its adapter and its importance scores.

The adapter's low-rank deltas are compressed module by module (graft.skillpack); each tensor's
share of the skill's importance mass goes into the manifest, and tensors whose share is below
`pack.min_importance_share` are left out of the pack. With `pack.calibrate`, each layer's input
scale on the skill's training data (the expert run on `calibration_examples` of them) makes the SVD
calibration-aware (graft.calibration). Output: `<root>/pack/<skill>-<key>/`.
"""

from __future__ import annotations

from pathlib import Path

from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.importance import load_scores, module_summary
from graft.lora import read_lora_deltas
from graft.skillpack import PackSettings, pack_skill
from pipelines.cache import content_key
from pipelines.context import RunContext, StageResult

NAME = "pack"


def run(ctx: RunContext) -> StageResult:
    spec, pk = ctx.spec, ctx.spec.pack
    prep, trained, scored = ctx.results["testbed"].info, ctx.results["train"], ctx.results["score"]
    settings = PackSettings(energy=pk.energy, bits=tuple(pk.bits), band_fractions=tuple(pk.band_fractions))
    result = StageResult(NAME)
    for s in spec.skills:
        key = content_key(trained.keys[s.name], scored.keys[s.name], pk, pk.calibrate and prep["data"][s.name]["key"])

        def build(tmp: Path, run, skill=s.name) -> dict[str, float]:
            deltas = read_lora_deltas(trained.outputs[skill])
            share = {k: v["share"] for k, v in module_summary(load_scores(scored.outputs[skill] / "scores.safetensors")).items()}
            kept = {k: d for k, d in deltas.items() if share.get(k, 1.0) >= pk.min_importance_share}
            reader = CheckpointReader(prep["base"])
            source = {"adapter": str(trained.outputs[skill]), "base": prep["base"], "job": spec.name,
                      "importance_share": {k: share.get(k) for k in kept}, "dropped": sorted(set(deltas) - set(kept))}
            scales = _input_scales(prep, str(trained.outputs[skill]), prep["data"][skill]["train"], list(kept), pk.calibration_examples,
                                   spec.train.max_length, spec.trust_remote_code) if pk.calibrate else None
            pack = pack_skill(skill, kept, base_fingerprint(reader, list(kept)), settings, source, input_scales=scales)
            pack.write_into(tmp)
            run.artifact(tmp, "skillpack")
            m = pack.manifest
            return {"bytes": m["total_bytes"], "bf16_delta_bytes": m["delta_bf16_bytes"],
                    "bytes_ratio": m["total_bytes"] / m["delta_bf16_bytes"], "tensors": len(kept),
                    "mean_rank": sum(e.get("rank", 0) for e in m["tensors"].values()) / max(1, len(kept))}

        ctx.run_item(NAME, s.name, key, {"skill": s.name, **pk.model_dump(mode="json")}, build, result)
    return result



def _input_scales(prep: dict, adapter: str, data: str, keys: list[str], examples: int, max_length: int,
                  trust_remote_code: bool) -> dict:
    """Per-layer input RMS of the expert (base + adapter) on the first `examples` training rows."""
    from transformers import AutoTokenizer

    from graft.calibration import input_scales_on
    from graft.data import read_jsonl
    from graft.lora import load_with_adapter

    model = load_with_adapter(prep["base"], adapter, trust_remote_code)
    return input_scales_on(model, AutoTokenizer.from_pretrained(prep["tokenizer"]), read_jsonl(data)[:examples], keys, max_length)
