"""Stage `port_eval`: each ported patch on each new base, against the new base alone and against a fine-tune on it.

Reads `Base`, `Datasets`, `Experts`, `Ported`; writes `Report`; uses the `evaluate` section.
Rows of the report (held-out exact match on every skill, and on `general` when the job has it):
- `<base>/expert`: each skill's patch on the base it was trained on (where the patch starts);
- `<new>/zero_shot`: the new base alone;
- `<new>/ported`: the new base plus the skill's patch (`graft.port.ported_model`), nothing trained;
- `<new>/finetuned`: the skill's expert trained on the new base (with `port.reference_finetune`).
In the per-skill rows, each skill's column comes from its own patch, and `general` is the mean over
the skills' patched models. One Ray task per model. Output: `<root>/port_eval/report-<key>/` with
`eval.json` ({row: {skill: accuracy}}), `eval.txt`, `eval.png` and `decay.png` (per skill, accuracy across
the new bases for zero-shot, ported and fine-tuned: how a patch decays as versions accumulate).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.artifacts import Base, Datasets, Experts, Ported, Report
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.report import accuracy_chart, accuracy_table
from pipelines.spec import EvaluateSpec

NAME = "port_eval"
READS = (Base, Datasets, Experts, Ported)
WRITES = (Report,)
SECTIONS = ("evaluate",)
VARIANTS = ("zero_shot", "ported", "finetuned")


@dataclass(frozen=True)
class Candidate:
    """One model to score: `base` alone, with an `expert` loaded on it, or with a `patch` (taken against `patch_base`) added."""

    row: str
    skills: tuple[str, ...]
    base: Ref
    expert: Ref | None = None
    patch: Ref | None = None
    patch_base: Ref | None = None


@dataclass(frozen=True)
class PortEvalRequest:
    candidates: tuple[Candidate, ...]
    kind: str
    tokenizer: Ref
    tests: tuple[tuple[str, Ref], ...]
    settings: EvaluateSpec
    trust_remote_code: bool
    placement: Placement


def score_candidate(c: Candidate, req: PortEvalRequest) -> dict[str, float]:
    """Accuracy of one candidate on its skills and on `general` when the job has it (a Ray task)."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match
    from graft.experts import Expert
    from graft.lora import load_with_adapter
    from graft.port import ported_model

    req.placement.enter()
    load = req.placement.load_options(req.trust_remote_code)
    ev = req.settings
    if c.expert is not None:
        model = Expert(Path(c.expert.path), req.kind).load(c.base.path, options=load)
    elif c.patch is not None:
        model = ported_model(c.base.path, Expert(Path(c.patch.path), req.kind).deltas(c.patch_base.path), options=load)
    else:
        model = load_with_adapter(c.base.path, None, options=load)
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    tests = dict(req.tests)
    wanted = [*c.skills, *(["general"] if "general" in tests else [])]
    return {s: exact_match(model, tok, read_jsonl(tests[s].path)[:ev.examples], ev.max_new_tokens, ev.batch_size) for s in wanted}


def candidates(spec, base: Base, experts: Experts, ported: Ported) -> list[Candidate]:
    skills = tuple(s.name for s in spec.skills)
    old = "base-v1" if spec.base == "testbed" else Path(spec.base).name
    out = [Candidate(f"{old}/expert", (s,), base.model, expert=experts[s]) for s in skills]
    for name, checkpoint in ported.bases.items():
        out.append(Candidate(f"{name}/zero_shot", skills, checkpoint.model))
        out += [Candidate(f"{name}/ported", (s,), checkpoint.model, patch=experts[s], patch_base=base.model) for s in skills]
        out += [Candidate(f"{name}/finetuned", (s,), checkpoint.model, expert=ported.references[Ported.pair(s, name)])
                for s in skills if Ported.pair(s, name) in ported.references]
    return out


def table_of(results: list[tuple[Candidate, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """{row: {skill: accuracy}}; a per-skill row's `general` is the mean over its skills' models."""
    table: dict[str, dict[str, float]] = {}
    general: dict[str, list[float]] = {}
    for c, acc in results:
        row = table.setdefault(c.row, {})
        row.update({s: acc[s] for s in c.skills})
        if "general" in acc:
            general.setdefault(c.row, []).append(acc["general"])
    for row, values in general.items():
        table[row]["general"] = sum(values) / len(values)
    return table


def decay_chart(table: dict[str, dict[str, float]], bases: list[str], skills: list[str], path: Path, title: str) -> Path:
    """Per skill, accuracy across the new bases (in `port.to` order) for zero-shot, ported and fine-tuned."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(skills), figsize=(4 * len(skills), 3.5), squeeze=False)
    for ax, skill in zip(axes[0], skills):
        for variant, style in zip(VARIANTS, ("o:", "o-", "s--")):
            ys = [table.get(f"{b}/{variant}", {}).get(skill) for b in bases]
            if any(y is not None for y in ys):
                ax.plot(bases, [float("nan") if y is None else y for y in ys], style, label=variant)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(skill)
        ax.set_xlabel("new base")
        ax.set_ylabel("exact match")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, ev = ctx.spec, ctx.spec.evaluate
    base, data, experts, ported = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts), ctx.board.get(Ported)
    skills = [s.name for s in spec.skills]
    tests = [(s, data[s].test) for s in skills]
    if "general" in data and spec.base == "testbed":
        tests.append(("general", data["general"].test))
    req = PortEvalRequest(tuple(candidates(spec, base, experts, ported)), experts.kind, base.tokenizer, tuple(tests), ev,
                          spec.trust_remote_code, placement(spec))
    result = StageResult(NAME)

    def build(tmp: Path, run) -> dict[str, float]:
        remote = ray.remote(**req.placement.ray_options())(score_candidate)
        refs = {f"{c.row} ({i + 1})": remote.remote(c, req) for i, c in enumerate(req.candidates)}
        table = table_of(list(zip(req.candidates, gather(refs, NAME, ctx.log, unit="models").values())))
        (tmp / "eval.json").write_text(json.dumps(table, indent=1))
        (tmp / "eval.txt").write_text(accuracy_table(table) + "\n")
        accuracy_chart(table, tmp / "eval.png", f"{spec.name}: held-out exact match")
        decay_chart(table, list(ported.bases), skills, tmp / "decay.png", f"{spec.name}: a patch across base versions")
        return {f"acc.{m}.{s}".replace("/", "."): v for m, row in table.items() for s, v in row.items()}

    key = content_key(req)
    out = ctx.run_item(NAME, "report", key, {"rows": len(req.candidates), **ev.model_dump(mode="json")}, build, result)
    table = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "eval.txt", "eval.png", "decay.png"):
        ctx.parent.artifact(out / name, "report")
    result.artifacts.append(Report(Ref(str(out), key), table))
    result.metrics = {f"{row}.{s}": v for row, accs in table.items() if row.endswith("/ported") for s, v in accs.items()}
    return result
