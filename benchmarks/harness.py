"""graftline's exact match beside lm-evaluation-harness's, for the demo's models on every testbed skill.

The demo job (`jobs/demo.yaml`) is run, or reused from its output folder. Every testbed skill's held-out split
(the rows `graft export-tasks` writes: same generator, size and seed as the job's testbed stage) is then scored
on each of the demo's models twice, as the evaluate stage scores them:
- graftline: `graft.evaluation.exact_match` on the model as the evaluate stage loads it (a LoRA expert merged);
- lm-eval: `simple_evaluate` through `HFLM` on the model as `evaluate.harness` loads it (a LoRA expert's adapter
  unmerged, the grafted model routed), on the exported task.
Each side is timed on its own (model loading excluded; lm-eval's task building and dataset loading included).
Target: the two agree to within one example on every row.

Writes `benchmarks/results/harness.json`:
  {"rows": [{"model", "task", "graftline_exact_match", "lm_eval_exact_match", "graftline_seconds", "lm_eval_seconds",
             "examples", "differing_examples"}], "target_met", "machine", "provenance"}

    .venv/bin/python benchmarks/harness.py [--job jobs/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402
from common import machine  # noqa: E402

from graft.evaluation import generate_answers  # noqa: E402
from graft.harness import generations, metrics_of, run_tasks, select_tasks, skill_task_name, write_skill_task  # noqa: E402
from graft.testbed.skills import SKILLS, generate  # noqa: E402
from pipelines.artifacts import Base, Experts, Grafted  # noqa: E402
from pipelines.driver import run_job  # noqa: E402
from pipelines.evaluation import open_model  # noqa: E402
from pipelines.placement import Placement  # noqa: E402
from pipelines.inputs import digest_cache  # noqa: E402
from pipelines.spec import load_job  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="jobs/demo.yaml")
    ap.add_argument("--out", default="benchmarks/results/harness.json")
    args = ap.parse_args()
    started = time.time()

    import torch
    from transformers import AutoTokenizer

    from graft.experts import Expert

    torch.set_num_threads(2)
    spec = load_job(args.job)
    board = run_job(spec, Path(args.job)).board
    base, experts, grafted = board.get(Base), board.get(Experts), board.get(Grafted)
    tok = AutoTokenizer.from_pretrained(base.tokenizer.path)
    cache = str(digest_cache(spec).folder)
    CPU = Placement("cpu", "float32", 0.0, 1)  # noqa: N806 - what the committed comparison ran on
    ev = spec.evaluate
    models = {"base": (base.model, None)} | {f"expert-{s.name}": (base.model, experts[s.name]) for s in spec.skills}
    models["grafted"] = (grafted.model, None)

    rows_out = []
    with tempfile.TemporaryDirectory() as scratch:
        held_out = {s: generate(s, "test", spec.testbed.eval_examples, spec.seed) for s in SKILLS.names()}
        tasks = {s: (rows[:ev.examples], write_skill_task(s, rows, Path(scratch), ev.max_new_tokens)) for s, rows in held_out.items()}
        for name, (model, expert) in models.items():
            ours_model = (Expert(Path(expert.path), experts.kind).load(model.path) if expert is not None
                          else open_model(model, None, experts.kind, CPU, False, cache))
            theirs_model = open_model(model, expert, experts.kind, CPU, False, cache)
            for skill, (rows, task) in tasks.items():
                t0 = time.time()
                ours = generate_answers(ours_model, tok, [r["prompt"] for r in rows], ev.max_new_tokens, ev.batch_size)
                t1 = time.time()
                res = run_tasks(theirs_model, tok, select_tasks([str(task)]), limit=ev.examples, batch_size=ev.batch_size,
                                samples=True)
                t2 = time.time()
                theirs = generations(res, skill_task_name(skill))
                row = {"model": name, "task": skill_task_name(skill),
                       "graftline_exact_match": round(sum(g == r["answer"] for g, r in zip(ours, rows)) / len(rows), 4),
                       "lm_eval_exact_match": round(metrics_of(res)[skill_task_name(skill)]["exact_match"], 4),
                       "graftline_seconds": round(t1 - t0, 2), "lm_eval_seconds": round(t2 - t1, 2),
                       "examples": len(rows), "differing_examples": sum(a != b for a, b in zip(ours, theirs))}
                rows_out.append(row)
                print(json.dumps(row), flush=True)
            del ours_model, theirs_model

    met = all(abs(r["graftline_exact_match"] - r["lm_eval_exact_match"]) * r["examples"] <= 1 + 1e-9 for r in rows_out)
    result = {"rows": rows_out, "target_met": met, "machine": machine(), "provenance": provenance([spec.seed], started)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.out}: {len(rows_out)} rows; agree within one example on every row: {met}")


if __name__ == "__main__":
    main()
