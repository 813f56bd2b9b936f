"""Quality gates of the synthetic testbed (issue: the embedded default), measured end to end.

Builds the whole testbed from nothing with `jobs/testbed.yaml` (fresh output folder, so nothing is
reused; DeepSpeed's one-time compile of its CPU op happens before the clock starts and is reported
apart), trains a LoRA expert per skill through the pipeline, evaluates every model and writes
`benchmarks/results/testbed.json`:
  {"machine", "build_seconds", "accuracy": {MODEL: {SKILL: 0..1}}, "behaviour_rate": {MODEL: 0..1},
   "gates": {GATE: bool}}

    .venv/bin/python benchmarks/testbed.py [--job jobs/testbed.yaml] [--out benchmarks/results/testbed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from graft.data import read_jsonl
from graft.evaluation import behaviour_rate, exact_match
from graft.testbed.skills import shows_behaviour
from pipelines.artifacts import Base, Datasets, Models, Report
from pipelines.driver import run_job
from pipelines.spec import load_job

SKILLS = ("add", "reverse", "sort", "vocab")


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, CPU"


def build_deepspeed_op() -> float:
    """Compile DeepSpeed's CPU communication op now (once per machine, then cached), outside the timed build."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    t0 = time.time()
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="jobs/testbed.yaml")
    ap.add_argument("--out", default="benchmarks/results/testbed.json")
    ap.add_argument("--output-dir", type=Path, default=None,
                    help="build here and keep the outputs (for the skillpack/continual benchmarks); default: a temporary folder")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = load_job(args.job)
    op_seconds = build_deepspeed_op()
    with tempfile.TemporaryDirectory(prefix="graftline-testbed-") as tmp:
        root = args.output_dir or Path(tmp)
        if (root / spec.name).exists():
            raise SystemExit(f"{root / spec.name} exists: the build would be reused, not measured; remove it or pick another --output-dir")
        spec = spec.model_copy(update={"output_dir": root, "tracking": spec.tracking.model_copy(update={"uri": None})})
        t0 = time.time()
        job = run_job(spec, Path(args.job))
        total = time.time() - t0
        results, base, data = job.results, job.board.get(Base), job.board.get(Datasets)
        table = job.board.get(Report).table
        tok = AutoTokenizer.from_pretrained(base.tokenizer.path)
        tests = {s: read_jsonl(data[s].test.path) for s in (*SKILLS, "general")}
        concept = [r["prompt"] for r in read_jsonl(data["concept"].test.path)] if "concept" in data else None
        if concept is None:
            from graft.testbed.skills import generate

            concept = [r["prompt"] for r in generate("concept", "test", spec.testbed.eval_examples, spec.seed)]
        torch.set_num_threads(os.cpu_count() or 1)
        accuracy: dict[str, dict[str, float]] = {}
        behaviour: dict[str, float] = {}
        for name, checkpoint in job.board.get(Models).by_name.items():
            model = AutoModelForCausalLM.from_pretrained(checkpoint.model.path, use_safetensors=True)
            accuracy[name] = {s: exact_match(model, tok, rows, spec.evaluate.max_new_tokens) for s, rows in tests.items()}
            behaviour[name] = behaviour_rate(model, tok, concept, shows_behaviour, spec.evaluate.max_new_tokens)
        for model_name, row in table.items():
            if model_name.startswith("expert-"):
                accuracy[model_name] = row

    base = accuracy["base-v1"]
    gates = {
        "base_v1_at_most_10pct_on_skills": all(base[s] <= 0.10 for s in SKILLS),
        "base_v1_at_least_90pct_general": base["general"] >= 0.90,
        "experts_at_least_90pct_on_skill": all(accuracy[f"expert-{s}"][s] >= 0.90 for s in SKILLS),
        "experts_within_5pts_general": all(accuracy[f"expert-{s}"]["general"] >= base["general"] - 0.05 for s in SKILLS),
        "source_hetero_at_least_90pct_on_its_skill": accuracy["source-hetero"][spec.testbed.source_skill] >= 0.90,
        "aligned_small_behaviour_at_least_90pct": behaviour["aligned-small"] >= 0.90,
        "base_and_target_behaviour_at_most_10pct": behaviour["base-v1"] <= 0.10 and behaviour["target-large"] <= 0.10,
        "build_at_most_300s": results["testbed"].seconds <= 300,
    }
    out = {"machine": machine(), "build_seconds": results["testbed"].seconds, "job_seconds": total,
           "deepspeed_op_build_seconds": op_seconds,
           "stage_seconds": {k: r.seconds for k, r in results.items()},
           "accuracy": accuracy, "behaviour_rate": behaviour, "gates": gates}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
