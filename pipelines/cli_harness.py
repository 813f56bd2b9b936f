"""`graft export-tasks OUT`: every testbed skill's held-out split as an lm-evaluation-harness task.

For the job given (default: the embedded demo), each skill's held-out rows are exactly those the job's testbed
stage writes (same generator, size and seed), so any testbed accuracy graftline reports can be recomputed with
lm-eval: `lm_eval --model hf --model_args pretrained=MODEL --include_path OUT --tasks graftline_add`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_JOB = "jobs/demo.yaml"


def cmd_export_tasks(args: argparse.Namespace) -> int:
    from graft.atomic import atomic_dir
    from graft.harness import skill_task_name, write_skill_task
    from graft.testbed.skills import SKILLS, generate
    from pipelines.cli import EXIT_SPEC, load_spec_or_report

    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    final = Path(args.out).expanduser().resolve()  # where atomic_dir puts the folder (it checks the target itself)
    skills = args.skills or SKILLS.names()
    for skill in skills:
        SKILLS.check(skill)
    with atomic_dir(args.out, overwrite=args.overwrite, kind="lm-eval tasks") as tmp:
        for skill in skills:
            rows = generate(skill, "test", spec.testbed.eval_examples, spec.seed)
            write_skill_task(skill, rows, tmp, spec.evaluate.max_new_tokens, final=final)
    names = ",".join(skill_task_name(s) for s in skills)
    print(f"{args.out}: {len(skills)} lm-eval tasks ({spec.testbed.eval_examples} held-out rows each, seed {spec.seed}); "
          f"run them with: lm_eval --model hf --model_args pretrained=MODEL --include_path {Path(args.out).resolve()} "
          f"--tasks {names}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export-tasks", help="write each testbed skill's held-out split as an lm-eval task (generate_until, "
                                            "exact match), to recompute graftline's numbers with lm-eval")
    e.add_argument("out", help="a new folder for the task YAMLs and their data (refused if it exists, unless --overwrite)")
    e.add_argument("--job", default=DEFAULT_JOB, help=f"the job whose testbed split is exported (default {DEFAULT_JOB})")
    e.add_argument("--skills", nargs="+", help="only these testbed skills (default: all)")
    e.add_argument("--overwrite", action="store_true", help="replace OUT if it is a folder graftline wrote")
    e.set_defaults(fn=cmd_export_tasks)
