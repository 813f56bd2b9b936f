"""Stage `distill`: a source model answers each skill's training prompts; the answers that pass become its training data.

Reads `Datasets` and `Models`; writes `Datasets` (each skill's training split replaced by the source's
checked answers, its held-out split untouched); uses the `distill` section.

GraftLLM's first step (methods.md §1.1, `graft.distill`). The source is a testbed model
(`testbed:source-hetero`: another family and size than the base) or any HF causal LM by folder or hub
id, with its own tokenizer. Generation is fanned out with Ray Data: `map_batches` over every skill's
prompts on a pool of `distill.actors` actors, each loading the source once. The driver checks the
source before the fan-out (safetensors weights, an eos token), applies the checker, and refuses a
source that answers nothing or passes no check, so the stage never hands on an empty dataset.
Outputs: `<root>/distill/<skill>-<key>/train.jsonl` (the kept rows), `answers.jsonl` (every prompt,
its reference if any, the source's answer and whether it was kept) and `distill.json` (the counts).
Logs (child run `distill/<skill>`): prompts, kept, dropped, empty, rejected and kept_fraction, and `distill.json`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from graft.data import read_jsonl, write_jsonl
from graft.distill import CheckerLimits, DistillError, check_can_generate, filter_answers
from pipelines.artifacts import Datasets, Models, Split
from pipelines.cache import Ref, content_key
from pipelines.context import Item, RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.spec import DistillSpec, JobSpec
from pipelines.inputs import named_model, named_model_problems

NAME = "distill"
READS = (Datasets, Models)
WRITES = (Datasets,)
SECTIONS = ("distill",)


@dataclass(frozen=True)
class DistillRequest:
    """Everything one skill's distilled data depends on; its content key is the hash of all of it."""

    source: Ref
    tokenizer: Ref
    prompts: Ref  # the skill's training split
    settings: DistillSpec
    trust_remote_code: bool
    placement: Placement


def problems(spec: JobSpec) -> list[str]:
    """A testbed source the job does not build, or a source folder that is not there."""
    return named_model_problems("distill.source", spec.distill.source, spec)


class Answerer:
    """A Ray Data actor: loads the source once, then answers batches of prompts by greedy generation."""

    def __init__(self, source: str, tokenizer: str, max_new_tokens: int, batch_size: int, where: Placement,
                 trust_remote_code: bool) -> None:
        from transformers import AutoTokenizer

        from graft.loading import load_causal_lm

        where.enter()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(source, where.load_options(trust_remote_code))
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from graft.evaluation import generate_answers

        answers = generate_answers(self.model, self.tokenizer, [str(p) for p in batch["prompt"]], self.max_new_tokens,
                                   self.batch_size)
        return {"skill": batch["skill"], "index": batch["index"], "answer": np.array(answers, dtype=object)}


def answer_prompts(reqs: dict[str, DistillRequest], rows: dict[str, list[dict]], settings: DistillSpec) -> dict[str, list[str]]:
    """Every skill's prompts answered by the source, fanned out over a Ray Data actor pool; answers in row order."""
    import ray.data

    first = next(iter(reqs.values()))
    items = [{"skill": skill, "index": i, "prompt": row["prompt"]}
             for skill, skill_rows in rows.items() for i, row in enumerate(skill_rows)]
    answered = ray.data.from_items(items).map_batches(
        Answerer, batch_size=settings.batch_size, compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.cpus_per_actor, num_gpus=first.placement.num_gpus,
        fn_constructor_kwargs={"source": first.source.path, "tokenizer": first.tokenizer.path,
                               "max_new_tokens": settings.max_new_tokens, "batch_size": settings.batch_size,
                               "where": first.placement, "trust_remote_code": first.trust_remote_code}).take_all()
    out = {skill: [""] * len(skill_rows) for skill, skill_rows in rows.items()}
    for r in answered:
        out[str(r["skill"])][int(r["index"])] = str(r["answer"])
    return out


def precheck(source: Ref, tokenizer: Ref, trust_remote_code: bool) -> None:
    """Refuse, before any actor starts, a source with pickled weights only or a tokenizer that cannot end an answer."""
    from transformers import AutoTokenizer

    from graft.checkpoint import weight_files

    weight_files(source.path)
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DistillError(f"{tokenizer.path}: cannot load the source's tokenizer ({str(e).splitlines()[0]})") from None
    check_can_generate(tok, source.path)


def run(ctx: RunContext) -> StageResult:
    spec, ds = ctx.spec, ctx.spec.distill
    data = ctx.board.get(Datasets)
    checkpoint = named_model(ds.source, ctx.board.get(Models))
    source, tokenizer = checkpoint.model, checkpoint.tokenizer
    result = StageResult(NAME)
    where = replace(placement(spec), threads=ds.cpus_per_actor)
    reqs = {s.name: DistillRequest(source, tokenizer, data[s.name].train, ds, spec.trust_remote_code, where) for s in spec.skills}
    keys = {name: content_key(req) for name, req in reqs.items()}
    items = [Item(name, keys[name], {"skill": name, **ds.model_dump(mode="json")}) for name in reqs]

    def build(todo) -> dict[str, dict[str, float]]:
        precheck(source, tokenizer, spec.trust_remote_code)
        rows = {name: read_jsonl(reqs[name].prompts.path)[:ds.examples] for name in todo}
        ctx.log(f"  distill: {sum(map(len, rows.values()))} prompts of {', '.join(todo)} answered by {ds.source} "
                f"on {ds.actors} actors")
        answers = answer_prompts({n: reqs[n] for n in todo}, rows, ds)
        metrics = {}
        for name, (tmp, run) in todo.items():
            distilled = filter_answers(rows[name], answers[name], ds.checker, CheckerLimits(ds.max_chars), source=ds.source)
            write_jsonl(tmp / "train.jsonl", distilled.rows)
            write_jsonl(tmp / "answers.jsonl", [{"prompt": r["prompt"], "reference": r.get("answer"), "answer": a, "kept": k}
                                                for r, a, k in zip(rows[name], answers[name], distilled.keep)])
            stats = distilled.stats()
            (tmp / "distill.json").write_text(json.dumps({"source": ds.source, "checker": ds.checker, **stats}, indent=1))
            run.artifact(tmp / "distill.json")
            metrics[name] = stats
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    by_name = dict(data.by_name)
    for name, path in paths.items():
        by_name[name] = Split(Ref(str(Path(path) / "train.jsonl"), f"{keys[name]}:train"), data[name].test)
    result.artifacts.append(Datasets(by_name))
    return result
