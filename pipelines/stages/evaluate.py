"""Stage `evaluate`: what each model can do, and what grafting cost it elsewhere.

Reads `Base`, `Datasets`, `Experts`, `Grafted`; writes `Report`.

Models: the base, each expert and the grafted model. One Ray task per model scores every skill's held-out split
by batched greedy exact match, and retained general ability on `evaluate.general`'s source
(`pipelines.evaluation.general_source`: the testbed's `general`, the held-out part of a replay file, ...). With
`evaluate.harness`, one Ray task per model × entry runs those lm-evaluation-harness tasks on it: experts with
their LoRA adapter unmerged, the grafted model as it is (a routed one routes), device and dtype from the spec.

Output `<root>/evaluate/report-<key>/`:
- `eval.json` ({model: {skill: accuracy, general: accuracy}}), `eval.txt` (with each model's general drop
  against the base in points), `eval.png`;
- `general.json`: the source, the drops, the limit (`evaluate.max_general_drop`) and the models over it;
- with a harness: `harness.json` ({model: {task: {metric: value}}}), `harness.txt` and lm-eval's own results
  JSON per model and entry under `lm_eval/`.
All of it is logged to the stage's run and the job's parent run, with each accuracy and harness metric as a metric.
A model over the general-drop limit is a warning: on the job's summary and as the parent run's
`graftline.warning` tag.
"""

from __future__ import annotations

import json
from pathlib import Path

from graft.data import read_jsonl
from graft.testbed.skills import SKILLS
from pipelines.artifacts import Base, Datasets, Experts, Grafted, Report
from pipelines.cache import Ref, content_key
from pipelines.waiting import gather
from pipelines.context import RunContext, StageResult
from pipelines.evaluation import EvaluateRequest, HarnessRequest, entry_identity, evaluate_model, general_source, harness_model
from pipelines.inputs import digest_cache, file_ref
from pipelines.placement import placement
from pipelines.report import accuracy_chart, accuracy_table, format_table, general_drops, table_rows
from pipelines.spec import JobSpec

NAME = "evaluate"
READS = (Base, Datasets, Experts, Grafted)
WRITES = (Report,)
SECTIONS = ("evaluate",)
GENERAL = "general"


def testbed_skills(spec: JobSpec) -> list[str]:
    """The testbed dataset general ability is measured on, when it is one."""
    source = general_source(spec)
    return [source.dataset] if source.dataset in SKILLS else []


def problems(spec: JobSpec) -> list[str]:
    """What makes the evaluation impossible, before any model is loaded: a general source without answers, a harness
    task lm-eval does not know, whose file does not parse or whose dataset does not load here."""
    from graft.harness import HarnessError, select_tasks, task_problems

    out: list[str] = []
    source = general_source(spec)
    if source.file is not None:
        try:
            read_jsonl(Path(source.file).expanduser())  # every row a prompt and its answer, or the line that is not
        except (OSError, ValueError) as e:
            out.append(f"evaluate.general: {source.label}: {e}")
    for entry in _entries(spec):
        try:
            selection = select_tasks([entry])
        except HarnessError as e:
            out.append(f"evaluate.harness: {e}")
            continue
        out += [f"evaluate.harness: {p}" for p in task_problems(selection)]
    return out


def _entries(spec: JobSpec) -> list[str]:
    """The harness entries: the job's, then the general source when it is an lm-eval task."""
    task = general_source(spec).task
    return list(dict.fromkeys([*spec.evaluate.harness, *([task] if task else [])]))


def run(ctx: RunContext) -> StageResult:
    import ray

    from graft.harness import select_tasks

    spec, ev = ctx.spec, ctx.spec.evaluate
    base, data, experts = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts)
    source = general_source(spec)
    tests = [(s.name, data[s.name].test) for s in spec.skills]
    if source.dataset is not None:
        tests.append((GENERAL, data[source.dataset].test))
    elif source.file is not None:
        tests.append((GENERAL, file_ref(source.file)))
    models: list[tuple[str, Ref, Ref | None]] = [("base", base.model, None)]
    models += [(f"expert-{s.name}", base.model, experts[s.name]) for s in spec.skills]
    models.append(("grafted", ctx.board.get(Grafted).model, None))
    req = EvaluateRequest(models=tuple(models), expert_kind=experts.kind, tokenizer=base.tokenizer, tests=tuple(tests),
                          settings=ev, trust_remote_code=spec.trust_remote_code, placement=placement(spec))
    entries = _entries(spec)
    harness = HarnessRequest(models=tuple(models), expert_kind=experts.kind, tokenizer=base.tokenizer,
                             entries=tuple((e, entry_identity(e)) for e in entries), settings=ev, placement=placement(spec),
                             trust_remote_code=spec.trust_remote_code) if entries else None
    result = StageResult(NAME)

    def build(tmp: Path, run) -> dict[str, float]:
        cache = str(digest_cache(ctx.spec).folder)
        remote = ray.remote(**req.placement.ray_options())(evaluate_model)
        refs = {name: remote.remote(model, expert, req, cache) for name, model, expert in req.models}
        lm_refs = {}
        if harness is not None:
            lm_remote = ray.remote(**harness.placement.ray_options())(harness_model)
            lm_refs = {(name, i): lm_remote.remote(model, expert, entry, harness, cache)
                       for name, model, expert in harness.models for i, (entry, _) in enumerate(harness.entries)}
        table = gather(refs, NAME, ctx.log, unit="models")
        metrics = {f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()}
        if lm_refs:
            merged = _write_harness(tmp, run, gather(lm_refs, f"{NAME} (lm-eval)", ctx.log, unit="model × task runs"))
            metrics |= {f"harness.{m}.{t}.{k}": v for m, row in merged.items() for t, ms in row.items() for k, v in ms.items()}
            if source.task is not None:  # general ability is the general task's first metric
                (task,) = select_tasks([source.task]).names[:1]
                for model, row in merged.items():
                    table[model][GENERAL] = next(iter(row[task].values()))
        drops = general_drops(table)
        over = sorted(m for m, d in drops.items() if d > ev.max_general_drop)
        (tmp / "eval.json").write_text(json.dumps(table, indent=1))
        (tmp / "general.json").write_text(json.dumps({"source": source.label, "base": table["base"][GENERAL],
                                                      "drop_points": drops, "max_general_drop": ev.max_general_drop,
                                                      "over": over}, indent=1))
        accuracy_chart(table, tmp / "eval.png", f"{spec.name}: held-out exact match")
        (tmp / "eval.txt").write_text(accuracy_table(table, drops) + f"\n\ngeneral: {source.label}\n")
        for f in ("eval.json", "eval.png", "eval.txt", "general.json", "harness.json", "harness.txt"):
            if (tmp / f).is_file():
                run.artifact(tmp / f, "report")
        run.table(table_rows(table, drops), "eval_table.json")
        return metrics | {f"general_drop.{m}": d for m, d in drops.items()}

    key = content_key(req, harness)
    out = ctx.run_item(NAME, "report", key, {"models": [m[0] for m in models], "tests": [t[0] for t in tests],
                                             "general": source.label, **ev.model_dump(mode="json")}, build, result)
    table = json.loads((out / "eval.json").read_text())
    general = json.loads((out / "general.json").read_text())
    for path in sorted(out.iterdir()):
        if path.is_dir():
            for f in sorted(path.iterdir()):
                ctx.parent.artifact(f, f"report/{path.name}")
        elif not path.name.startswith("."):
            ctx.parent.artifact(path, "report")
    ctx.parent.table(table_rows(table, general["drop_points"]), "eval_table.json")
    if (out / "harness.json").is_file():
        ctx.parent.table(harness_rows(json.loads((out / "harness.json").read_text())), "harness_table.json")
    # the report item's metrics (built now or read from its marker): accuracies, general drops, lm-eval's values
    ctx.parent.metrics({k.removeprefix("report."): v for k, v in result.metrics.items()})
    if general["over"]:
        result.warnings.append(f"general ability ({general['source']}) fell more than {general['max_general_drop']:g} points "
                               "against the base on " + ", ".join(f"{m} (-{general['drop_points'][m]:g})" for m in general["over"]))
    result.artifacts.append(Report(Ref(str(out), key), table))
    result.metrics = {f"grafted.{s}": table["grafted"][s] for s in table["grafted"]}
    return result


def harness_rows(merged: dict[str, dict[str, dict[str, float]]]) -> list[dict[str, object]]:
    """lm-eval's {model: {task: {metric: value}}} as rows (`model`, then a `task:metric` column each), for an MLflow table."""
    return [{"model": model, **{f"{t}:{m}": v for t, ms in row.items() for m, v in ms.items()}} for model, row in merged.items()]


def _write_harness(tmp: Path, run, results: dict[tuple[str, int], dict]) -> dict[str, dict[str, dict[str, float]]]:
    """lm-eval's results, raw per model and entry (`lm_eval/`) and as one {model: {task: {metric: value}}} table
    (`harness.json`, `harness.txt`, and an MLflow table on `run`); returns that table."""
    from graft.harness import metrics_of

    raw = tmp / "lm_eval"
    raw.mkdir()
    merged: dict[str, dict[str, dict[str, float]]] = {}
    for (model, i), res in sorted(results.items()):
        (raw / f"{model}.{i}.json").write_text(json.dumps(res, indent=1))
        merged.setdefault(model, {}).update(metrics_of(res))
    (tmp / "harness.json").write_text(json.dumps(merged, indent=1))
    cols = sorted({(t, m) for row in merged.values() for t, ms in row.items() for m in ms})
    rows = [[model, *(f"{merged[model].get(t, {}).get(m, float('nan')):.4g}" for t, m in cols)] for model in merged]
    (tmp / "harness.txt").write_text(format_table(["model", *(f"{t}:{m}" for t, m in cols)], rows) + "\n")
    run.table(harness_rows(merged), "harness_table.json")
    return merged
