"""Stage `evaluate`: per-skill exact-match accuracy of the base, each expert and the grafted model.

Reads `Base`, `Datasets`, `Experts`, `Grafted`; writes `Report`.

One Ray task per model scores every skill's held-out split by batched greedy generation. Output:
`<root>/evaluate/report-<key>/eval.json` ({model: {skill: accuracy}}) and `eval.png`; both are
logged to the stage's run and to the job's parent run, with each accuracy as a metric.
"""

from __future__ import annotations

import json
from pathlib import Path


from pipelines.artifacts import Base, Datasets, Experts, Grafted, Report
from pipelines.cache import Ref, content_key
from pipelines.evaluation import EvaluateRequest, evaluate_model
from pipelines.context import RunContext, StageResult
from pipelines.report import accuracy_chart, accuracy_table
from pipelines.inputs import digest_cache

NAME = "evaluate"
READS = (Base, Datasets, Experts, Grafted)
WRITES = (Report,)
SECTIONS = ("evaluate",)


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, ev = ctx.spec, ctx.spec.evaluate
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    skills = [s.name for s in spec.skills] + (["general"] if "general" in data and spec.base == "testbed" else [])
    models: list[tuple[str, Ref, Ref | None]] = [("base", base.model, None)]
    models += [(f"expert-{s.name}", base.model, experts[s.name]) for s in spec.skills]
    models.append(("grafted", ctx.board.get(Grafted).model, None))
    req = EvaluateRequest(models=tuple(models), expert_kind=experts.kind, tokenizer=base.tokenizer,
                          tests=tuple((s, data[s].test) for s in skills), settings=ev, trust_remote_code=spec.trust_remote_code)
    result = StageResult(NAME)

    def build(tmp: Path, run) -> dict[str, float]:
        remote = ray.remote(num_cpus=1)(evaluate_model)
        cache = str(digest_cache(ctx.spec).folder)
        refs = {name: remote.remote(model, expert, req, cache) for name, model, expert in req.models}
        table = {m: ray.get(ref) for m, ref in refs.items()}
        (tmp / "eval.json").write_text(json.dumps(table, indent=1))
        accuracy_chart(table, tmp / "eval.png", f"{spec.name}: held-out exact match")
        (tmp / "eval.txt").write_text(accuracy_table(table) + "\n")
        return {f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()}

    key = content_key(req)
    out = ctx.run_item(NAME, "report", key, {"models": [m[0] for m in models], "skills": skills, **ev.model_dump(mode="json")},
                       build, result)
    table = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "eval.png", "eval.txt"):
        ctx.parent.artifact(out / name, "report")
    ctx.parent.metrics({f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()})
    result.artifacts.append(Report(Ref(str(out), key), table))
    result.metrics = {f"grafted.{s}": table["grafted"][s] for s in skills}
    return result
