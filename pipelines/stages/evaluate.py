"""Stage `evaluate`: per-skill exact-match accuracy of the base, each expert and the grafted model.

One Ray task per model scores every skill's held-out split by batched greedy generation. Output:
`<root>/evaluate/report-<key>/eval.json` ({model: {skill: accuracy}}) and `eval.png`; both are
logged to the stage's run and to the job's parent run, with each accuracy as a metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipelines.cache import content_key
from pipelines.context import RunContext, StageResult
from pipelines.report import accuracy_chart, accuracy_table

NAME = "evaluate"


def evaluate_model(model_path: str, adapter: str | None, tokenizer: str, tests: dict[str, str], examples: int | None,
                   max_new_tokens: int, batch_size: int, trust_remote_code: bool) -> dict[str, float]:
    """Accuracy of one model (base + optional adapter) on each skill's held-out file (a Ray task)."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match
    from graft.lora import load_with_adapter
    from graft.routing import RoutedModel, is_routed

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(tokenizer)
    model = RoutedModel.load(model_path) if is_routed(model_path) else load_with_adapter(model_path, adapter, trust_remote_code)
    return {skill: exact_match(model, tok, read_jsonl(path)[:examples], max_new_tokens, batch_size)
            for skill, path in tests.items()}


def run(ctx: RunContext) -> StageResult:
    import ray

    spec, ev = ctx.spec, ctx.spec.evaluate
    prep, trained, grafted = ctx.results["testbed"].info, ctx.results["train"], ctx.results["graft"]
    skills = [s.name for s in spec.skills] + (["general"] if "general" in prep["data"] and spec.base == "testbed" else [])
    tests = {s: prep["data"][s]["test"] for s in skills}
    models: dict[str, tuple[str, str | None]] = {"base": (prep["base"], None)}
    models.update({f"expert-{s.name}": (prep["base"], str(trained.outputs[s.name])) for s in spec.skills})
    models["grafted"] = (str(grafted.outputs["grafted"]), None)
    key = content_key(prep["base_key"], trained.keys, grafted.keys, [prep["data"][s]["key"] for s in skills], ev)
    result = StageResult(NAME)

    def build(tmp: Path, run) -> dict[str, float]:
        remote = ray.remote(num_cpus=1)(evaluate_model)
        refs = {m: remote.remote(path, adapter, prep["tokenizer"], tests, ev.examples, ev.max_new_tokens, ev.batch_size,
                                 spec.trust_remote_code) for m, (path, adapter) in models.items()}
        table = {m: ray.get(ref) for m, ref in refs.items()}
        (tmp / "eval.json").write_text(json.dumps(table, indent=1))
        accuracy_chart(table, tmp / "eval.png", f"{spec.name}: held-out exact match")
        (tmp / "eval.txt").write_text(accuracy_table(table) + "\n")
        return {f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()}

    out = ctx.run_item(NAME, "report", key, {"models": list(models), "skills": skills, **ev.model_dump(mode="json")}, build, result)
    table = json.loads((out / "eval.json").read_text())
    for name in ("eval.json", "eval.png", "eval.txt"):
        ctx.parent.artifact(out / name, "report")
    ctx.parent.metrics({f"acc.{m}.{s}": v for m, row in table.items() for s, v in row.items()})
    result.info["table"] = table
    result.metrics = {f"grafted.{s}": table["grafted"][s] for s in skills}
    return result
