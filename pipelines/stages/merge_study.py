"""Stage `merge_study`: every merge against grafting, on the vocabulary in both languages (methods.md §4).

Reads `Base`, `Datasets`, `Experts`, `Packs`, `Merged`; writes `Report`; uses the `merge_study`, `graft` (the
router's prompts) and `evaluate` sections.

First the domain's SkillPack is grafted into the language expert by each of `merge_study.grafts` (an item
each; the pack was taken against the base, so the language expert is a drifted base to it, as a newer version
of a model is), and, as a reference for what the pack carries by itself, additively into the base it was made
for (`domain_pack`). Then every model — the base, the two experts, each merge and each graft — is scored on the
held-out rows of the vocabulary in the second language (`domain_lang2`, which no model was trained on), the
vocabulary in the first (`domain`), general data (`general`) and the second language's general data
(`language`), one Ray task per model.
Output: `<root>/merge_study/report-<key>/` with `eval.json` ({model: {skill: accuracy}}), `rows.json` (one row
per merge and graft: `method`, `vocab_accuracy_lang2`, `vocab_accuracy_lang1`, `general`, `general_lang2`),
`eval.txt` and `eval.png`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import Base, Datasets, Experts, Merged, Packs, Report
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import Item, RunContext, StageResult
from pipelines.report import accuracy_chart, accuracy_table
from pipelines.spec import GraftSpec, JobSpec
from pipelines.evaluation import EvaluateRequest, evaluate_model
from pipelines.placement import placement
from pipelines.merging import measured_skills
from pipelines.inputs import digest_cache

NAME = "merge_study"
READS = (Base, Datasets, Experts, Packs, Merged)
WRITES = (Report,)
SECTIONS = ("merge_study", "graft", "evaluate")
GRAFT_PREFIX = "graft_"
PACK_ON_BASE = "domain_pack"  # the domain's pack grafted into the base it was made for: what the pack carries by itself


def columns(spec: JobSpec) -> dict[str, str]:
    """The results' column names → the skill each measures."""
    ms = spec.merge_study
    return {"vocab_accuracy_lang2": ms.domain_lang2, "vocab_accuracy_lang1": ms.domain, "general": ms.general,
            "general_lang2": ms.language}


@dataclass(frozen=True)
class GraftIntoRequest:
    """The domain's pack grafted into the language expert by one fusion method."""

    target: Ref
    tokenizer: Ref
    pack: Ref
    domain: str
    fusion: str
    router_prompts: tuple[tuple[str, tuple[Ref, ...]], ...]
    settings: GraftSpec
    seed: int


def _prompts(refs: tuple[Ref, ...], n: int, seed: int) -> list[str]:
    """`n` prompts drawn (seeded) from the prompt/answer files, in equal shares."""
    from graft.data import read_jsonl

    out: list[str] = []
    for i, ref in enumerate(refs):
        rows = read_jsonl(ref.path)
        random.Random(seed + i).shuffle(rows)
        out += [r["prompt"] for r in rows[: n // len(refs)]]
    return out


def write_graft(req: GraftIntoRequest, folder: Path, cache) -> dict[str, Any]:
    """Graft the pack into the language expert (a drifted base to the pack) into `folder`; the fusion report."""
    from graft.fusion import FusionSettings, fuse_into
    from graft.skillpack import SkillPack

    g = req.settings
    settings = FusionSettings(scale=g.scale, seed=req.seed, tokenizer=req.tokenizer.path, digest_cache=cache,
                              router_prompts={c: _prompts(refs, g.router_examples, req.seed) for c, refs in req.router_prompts})
    return fuse_into(req.target.path, [SkillPack.load(req.pack.path)], [None], folder, req.fusion, settings, allow_base_drift=True)


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, ms = ctx.spec, ctx.spec.merge_study
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    packs, merged = ctx.board.get(Packs), ctx.board.get(Merged)
    result = StageResult(NAME)
    none = (data[ms.language].train, data[spec.graft.router_none].train if spec.graft.router_none in data else data[ms.general].train)
    grafts = {f"{GRAFT_PREFIX}{f}": GraftIntoRequest(experts[ms.language], base.tokenizer, packs[ms.domain], ms.domain, f,
                                                    ((ms.domain, (data[ms.domain].train,)), ("none", none)),
                                                    spec.graft.model_copy(update={"require_signature": None}), spec.seed)
              for f in ms.grafts}
    grafts[PACK_ON_BASE] = GraftIntoRequest(base.model, base.tokenizer, packs[ms.domain], ms.domain, "additive", (),
                                            spec.graft.model_copy(update={"require_signature": None}), spec.seed)
    cache = digest_cache(spec)

    def graft_all(todo: dict[str, tuple[Path, Any]]) -> dict[str, dict[str, float]]:
        from pipelines.tracking import write_json_artifact

        for row, (tmp, run) in todo.items():
            into = "base" if row == PACK_ON_BASE else f"{ms.language} expert"
            ctx.log(f"  {NAME}/{row}: {ms.domain}'s SkillPack into the {into}")
            write_json_artifact(run, write_graft(grafts[row], tmp, cache), "graft.json")
        return {row: {} for row in todo}

    graft_paths = ctx.run_items(NAME, [Item(row, content_key(req), {"fusion": req.fusion}) for row, req in grafts.items()],
                                graft_all, result)
    models: list[tuple[str, Ref, Ref | None]] = [("base", base.model, None),
                                                  ("language", base.model, experts[ms.language]),
                                                  ("domain", base.model, experts[ms.domain])]
    models += [(row, checkpoint.model, None) for row, checkpoint in merged.by_name.items()]
    models += [(row, Ref(str(graft_paths[row]), result.keys[row]), None) for row in grafts]
    cols = columns(spec)
    req = EvaluateRequest(models=tuple(models), expert_kind=experts.kind, tokenizer=base.tokenizer,
                          tests=tuple((s, data[s].test) for s in measured_skills(spec)), settings=spec.evaluate,
                          trust_remote_code=spec.trust_remote_code, placement=placement(spec))

    def build(tmp: Path, run) -> dict[str, float]:
        remote = ray.remote(**req.placement.ray_options())(evaluate_model)
        refs = {name: remote.remote(model, expert, req, str(cache.folder), name in grafts) for name, model, expert in req.models}
        table = gather(refs, NAME, ctx.log, unit="models")
        rows = [{"method": m, **{col: table[m][skill] for col, skill in cols.items()}} for m in table]
        (tmp / "eval.json").write_text(json.dumps(table, indent=1))
        (tmp / "rows.json").write_text(json.dumps(rows, indent=1))
        accuracy_chart(table, tmp / "eval.png", f"{spec.name}: {ms.domain} merged or grafted into {ms.language}, held-out exact match")
        (tmp / "eval.txt").write_text(accuracy_table(table) + "\n")
        return {f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()}

    key = content_key(req)
    out = ctx.run_item(NAME, "report", key, {"models": [m[0] for m in models], "columns": cols}, build, result)
    table = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "rows.json", "eval.png", "eval.txt"):
        ctx.parent.artifact(out / name, "report")
    ctx.parent.metrics({f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()})
    result.artifacts.append(Report(Ref(str(out), key), table))
    result.metrics = {f"{m}.{col}": table[m][skill] for m in table for col, skill in cols.items() if col.startswith("vocab")}
    return result
