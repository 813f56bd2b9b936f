"""Quality gates of the synthetic testbed (the embedded default), over seeds, measured end to end.

Per seed, builds the whole testbed from nothing with `jobs/testbed.yaml` at that seed (its own folder under
--output-dir, so nothing is reused across seeds; DeepSpeed's one-time compile of its CPU op happens before the
clock starts and is reported apart), trains a LoRA expert per skill through the pipeline and evaluates every model.
Every gate is judged on the worst seed: an "at least" gate on the minimum over seeds, an "at most" gate on the
maximum. Writes `benchmarks/results/testbed.json`:
  {"provenance", "job", "seeds", "build_seconds": {mean, min, max},
   "accuracy": {MODEL: {SKILL: {mean, min, max}}}, "accuracy_by_seed": {SEED: {MODEL: {SKILL: 0..1}}},
   "behaviour_rate": {MODEL: {mean, min, max}} (the `concept` behaviour unasked, on its copy prompts),
   "behaviour_rate_asked": {MODEL: {mean, min, max}} (asked for it, on the `shout:` prompts),
   "stage_seconds_by_seed", "gates": {GATE: bool}}

    .venv/bin/python benchmarks/testbed.py [--seeds 0 1 2] [--output-dir runs/bench-testbed]

The skillpack and continual benchmarks start from the first seed's testbed (`runs/bench-testbed/testbed-s0.yaml`).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from seeded import run_seeds, seed_job, write_job  # noqa: E402

from graft.data import read_jsonl  # noqa: E402
from graft.evaluation import behaviour_rate, exact_match  # noqa: E402
from graft.testbed.skills import shows_behaviour  # noqa: E402
from pipelines.artifacts import Base, Datasets, Models, Report  # noqa: E402
from pipelines.driver import run_job  # noqa: E402
from pipelines.spec import load_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "testbed.yaml"
SKILLS = ("add", "reverse", "sort", "vocab")


def build_deepspeed_op() -> float:
    """Compile DeepSpeed's CPU communication op now (once per machine, then cached), outside the timed build."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.accelerator import get_accelerator

    t0 = time.time()
    get_accelerator().create_op_builder("ShareMemCommBuilder").load()
    return time.time() - t0


def one_seed(base_job: dict, seed: int, output_dir: Path) -> dict:
    """Build the testbed at `seed` in a fresh folder and score every model and expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = f"testbed-s{seed}"
    if (output_dir / name).exists():
        raise SystemExit(f"{output_dir / name} exists: the build would be reused, not measured; remove it or pick another --output-dir")
    job = seed_job(base_job, seed, output_dir, name)
    job["tracking"] = {**job.get("tracking", {}), "uri": None}
    path = write_job(job, output_dir, name)
    spec = load_job(path)
    op_seconds = build_deepspeed_op()
    run = run_job(spec, path)
    base, data, table = run.board.get(Base), run.board.get(Datasets), run.board.get(Report).table
    tok = AutoTokenizer.from_pretrained(base.tokenizer.path)
    tests = {s: read_jsonl(data[s].test.path) for s in (*SKILLS, "general")}
    from graft.testbed.skills import generate

    concept_rows = generate("concept", "test", spec.testbed.eval_examples, spec.seed)
    concept, asking = [r["prompt"] for r in concept_rows], [r["positive"] for r in concept_rows]
    torch.set_num_threads(os.cpu_count() or 1)
    accuracy: dict[str, dict[str, float]] = {}
    behaviour: dict[str, float] = {}
    asked: dict[str, float] = {}
    for model_name, checkpoint in run.board.get(Models).by_name.items():
        model = AutoModelForCausalLM.from_pretrained(checkpoint.model.path, use_safetensors=True)
        accuracy[model_name] = {s: exact_match(model, tok, rows, spec.evaluate.max_new_tokens) for s, rows in tests.items()}
        behaviour[model_name] = behaviour_rate(model, tok, concept, shows_behaviour, spec.evaluate.max_new_tokens)
        asked[model_name] = behaviour_rate(model, tok, asking, shows_behaviour, spec.evaluate.max_new_tokens)
    accuracy.update({m: dict(row) for m, row in table.items() if m.startswith("expert-")})
    return {"accuracy": accuracy, "behaviour_rate": behaviour, "behaviour_rate_asked": asked, "deepspeed_op_build_seconds": op_seconds,
            "stage_seconds": {k: r.seconds for k, r in run.results.items()}}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def gates(acc: dict, behaviour: dict, asked: dict, build: dict, source_skill: str) -> dict[str, bool]:
    """Every gate on the worst seed: `acc`/`behaviour`/`asked`/`build` hold {mean, min, max} over seeds."""
    base = acc["base-v1"]
    return {
        "base_v1_at_most_10pct_on_skills": all(base[s]["max"] <= 0.10 for s in SKILLS),
        "base_v1_at_least_90pct_general": base["general"]["min"] >= 0.90,
        "experts_at_least_90pct_on_skill": all(acc[f"expert-{s}"][s]["min"] >= 0.90 for s in SKILLS),
        "experts_within_5pts_general": all(acc[f"expert-{s}"]["general"]["min"] >= base["general"]["min"] - 0.05 for s in SKILLS),
        "source_hetero_at_least_90pct_on_its_skill": acc["source-hetero"][source_skill]["min"] >= 0.90,
        "aligned_small_and_target_show_concept_when_asked_at_least_90pct":
            all(asked[m]["min"] >= 0.90 for m in ("aligned-small", "target-large")),
        "base_aligned_and_target_unasked_at_most_10pct":
            all(behaviour[m]["max"] <= 0.10 for m in ("base-v1", "aligned-small", "target-large")),
        "build_at_most_300s": build["max"] <= 300,
    }


def finish(per_seed: dict[int, dict], base_job: dict) -> dict:
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    acc = {m: {s: spread([per_seed[k]["accuracy"][m][s] for k in seeds]) for s in row} for m, row in first["accuracy"].items()}
    behaviour = {m: spread([per_seed[k]["behaviour_rate"][m] for k in seeds]) for m in first["behaviour_rate"]}
    asked = {m: spread([per_seed[k]["behaviour_rate_asked"][m] for k in seeds]) for m in first["behaviour_rate_asked"]}
    build = spread([per_seed[k]["stage_seconds"]["testbed"] for k in seeds])
    return {"seeds": seeds, "build_seconds": build, "accuracy": acc, "behaviour_rate": behaviour,
            "behaviour_rate_asked": asked, "gates": gates(acc, behaviour, asked, build, base_job["testbed"]["source_skill"]),
            "accuracy_by_seed": {k: per_seed[k]["accuracy"] for k in seeds},
            "behaviour_rate_by_seed": {k: per_seed[k]["behaviour_rate"] for k in seeds},
            "stage_seconds_by_seed": {k: per_seed[k]["stage_seconds"] for k in seeds},
            "deepspeed_op_build_seconds": first["deepspeed_op_build_seconds"]}


def main() -> None:
    out, path = run_seeds(__doc__, JOB, "testbed", one_seed, finish)
    print(f"wrote {path}: gates {out['gates']}")
    failed = [g for g, ok in out["gates"].items() if not ok]
    if failed:
        print(f"gates failed on the worst seed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
