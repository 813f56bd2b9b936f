"""Stage `pack`: one SkillPack per skill from its adapter and its importance scores.

The adapter's low-rank deltas are compressed module by module (graft.skillpack); each tensor's
share of the skill's importance mass goes into the manifest, and tensors whose share is below
`pack.min_importance_share` are left out of the pack. With `pack.budget` the pack holds at most that
fraction of the bf16 delta's bytes, its ranks allocated by `pack.allocation` (the importance scores
above make it importance-aware). When the pack is calibration-aware (`pack.quantizer: gptq`,
`pack.weighted_svd` or `pack.tune_steps`), the expert runs on `calibration_examples` of the skill's
training rows plus the replayed share of `train.replay_data` (the mix it was trained on): each
layer's input second moment goes to the compression (graft.calibration), and with `pack.tune_steps`
the pack's quantization grids are then fitted to the expert's answers on the same rows
(graft.grid_tuning; same bytes). Output: `<root>/pack/<skill>-<key>/`.
"""

from __future__ import annotations

from pathlib import Path

from graft.data import labelled_batches, read_jsonl, replay_mix
from graft.expert_packing import pack_expert
from graft.importance import load_scores, module_summary
from graft.lora import read_lora_deltas
from pipelines.cache import content_key
from pipelines.context import RunContext, StageResult
from pipelines.stages.train import replay_source

NAME = "pack"
CALIBRATION_BATCH = 32


def run(ctx: RunContext) -> StageResult:
    spec, pk = ctx.spec, ctx.spec.pack
    prep, trained, scored = ctx.results["testbed"].info, ctx.results["train"], ctx.results["score"]
    settings = pk.settings()
    replay = replay_source(prep, spec.train) if pk.calibrate else None
    result = StageResult(NAME)
    for s in spec.skills:
        key = content_key(trained.keys[s.name], scored.keys[s.name], pk, pk.calibrate and prep["data"][s.name]["key"],
                          replay and (replay["key"], spec.train.replay_fraction))

        def build(tmp: Path, run, skill=s.name) -> dict[str, float]:
            deltas = read_lora_deltas(trained.outputs[skill])
            scores = load_scores(scored.outputs[skill] / "scores.safetensors")
            share = {k: v["share"] for k, v in module_summary(scores).items()}
            kept = {k: d for k, d in deltas.items() if share.get(k, 1.0) >= pk.min_importance_share}
            source = {"adapter": str(trained.outputs[skill]), "base": prep["base"], "job": spec.name,
                      "importance_share": {k: share.get(k) for k in kept}, "dropped": sorted(set(deltas) - set(kept))}
            batches = None
            if pk.calibrate:
                from transformers import AutoTokenizer

                rows = _calibration_rows(prep["data"][skill]["train"], replay, spec.train.replay_fraction, pk.calibration_examples)
                batches = labelled_batches(AutoTokenizer.from_pretrained(prep["tokenizer"]), rows, spec.train.max_length, CALIBRATION_BATCH)
            pack = pack_expert(skill, prep["base"], trained.outputs[skill], kept, settings, calibration_batches=batches,
                               importance={k: scores[k] for k in kept if k in scores}, source=source, tune_steps=pk.tune_steps,
                               tune_lr=pk.tune_lr, trust_remote_code=spec.trust_remote_code)
            tuned = {f"grid_{k}": v for k, v in pack.manifest.get("grid_tuning", {}).items() if k in ("kl_before", "kl_after")}
            pack.write_into(tmp)
            run.artifact(tmp, "skillpack")
            m = pack.manifest
            return {"bytes": m["total_bytes"], "bf16_delta_bytes": m["delta_bf16_bytes"],
                    "bytes_ratio": m["total_bytes"] / m["delta_bf16_bytes"], "tensors": len(kept),
                    "mean_rank": sum(e.get("rank", 0) for e in m["tensors"].values()) / max(1, len(kept)), **tuned}

        ctx.run_item(NAME, s.name, key, {"skill": s.name, **pk.model_dump(mode="json")}, build, result)
    return result


def _calibration_rows(data: str, replay: dict | None, replay_fraction: float, examples: int) -> list[dict[str, str]]:
    """The first `examples` training rows of the skill, plus replay rows in the share training used."""
    rows = read_jsonl(data)[:examples]
    return replay_mix(rows, read_jsonl(replay["train"]), replay_fraction) if replay is not None else rows
