"""Stage `merge`: the merge study's merges of its two experts, one per entry of `merge_study.merges` (methods.md §4).

Reads `Base`, `Experts` (full fine-tunes of the base); writes `Merged`; uses the `merge_study` section.

Each entry is a mergekit-style config over the language expert, the domain expert and (for the task-vector
methods) their shared base, run by `graft.merge` — the executor behind `graft merge`, so a study's merge is
exactly what a user gets from the same YAML. One Ray task per merge, each its own output item and child run.
Output: `<root>/merge/<row>-<key>/`, a checkpoint folder with the tokenizer and the `merge.yaml` that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


from pipelines.artifacts import Base, Checkpoint, Experts, Merged
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import Item, RunContext, StageResult
from pipelines.merging import study_config, write_merge
from pipelines.spec import JobSpec, StudyMerge

NAME = "merge"
READS = (Base, Experts)
WRITES = (Merged,)
SECTIONS = ("merge_study",)


def problems(spec: JobSpec) -> list[str]:
    """Experts that are not full checkpoints, or a language/domain skill the job does not train."""
    ms, out = spec.merge_study, []
    if spec.train.method != "full":
        out.append(f"merge_study: merging needs full fine-tuned experts (train.method: full), got train.method: {spec.train.method}")
    skills = [s.name for s in spec.skills]
    for key in ("language", "domain"):
        if getattr(ms, key) not in skills:
            out.append(f"merge_study.{key}: {getattr(ms, key)!r} is not one of the job's skills ({', '.join(skills)})")
    if ms.language == ms.domain:
        out.append(f"merge_study.domain: the language and domain experts must differ, both are {ms.language!r}")
    return out


def testbed_skills(spec: JobSpec) -> list[str]:
    """The testbed datasets the study measures beyond the job's own skills (made by the testbed stage)."""
    return [spec.merge_study.domain_lang2, spec.merge_study.general]


@dataclass(frozen=True)
class MergeRequest:
    """One merge: the experts and base by content, the entry, and the seed DARE's random drops follow."""

    base: Ref
    tokenizer: Ref
    language: Ref
    domain: Ref
    merge: StudyMerge
    dtype: str
    seed: int


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, ms = ctx.spec, ctx.spec.merge_study
    base, experts = ctx.board.get(Base), ctx.board.get(Experts)
    requests = {row: MergeRequest(base.model, base.tokenizer, experts[ms.language], experts[ms.domain], m, ms.dtype, spec.seed)
                for row, m in ms.rows().items()}
    items = [Item(row, content_key(req), {"method": req.merge.method, **req.merge.model_dump(mode="json", exclude={"method"})})
             for row, req in requests.items()]
    result = StageResult(NAME)

    def build(todo: dict[str, tuple[Path, Any]]) -> dict[str, dict[str, float]]:
        remote = ray.remote(num_cpus=1)(write_merge)
        refs = {}
        for row, (tmp, _) in todo.items():
            req = requests[row]
            config = study_config(req.merge, req.base.path, req.language.path, req.domain.path, req.dtype, req.tokenizer.path)
            refs[row] = remote.remote(config, str(tmp), req.seed)
            ctx.log(f"  merge/{row}: {req.merge.method}")
        return gather(refs, NAME, ctx.log, unit="merges")

    paths = ctx.run_items(NAME, items, build, result)
    merged = {row: Checkpoint(Ref(str(p / "model"), it.key), base.tokenizer) for (row, p), it in zip(paths.items(), items)}
    result.artifacts.append(Merged(merged))
    return result
