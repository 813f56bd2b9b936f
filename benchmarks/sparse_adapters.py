"""Sparse adapters (methods.md §3): skill accuracy against trainable parameters, sparse against dense LoRA.

Per seed, on one testbed base (`jobs/sparse.yaml`'s testbed, built or reused through the pipeline), one skill's
expert is trained in every setting below, all in one Ray Train run through the train stage's own DeepSpeed loop
(`pipelines.training`), and scored on the skill's held-out set and on `general`:
- dense LoRA at ranks 4, 8, 16;
- a sparse adapter (PEFT SHiRA, entries fixed at initialization) per mask rule (random, magnitude, snip) at
  keep-fractions 0.1, 0.2, 0.4, 0.8 of the target modules' weights;
- "large-sparse": a sparse adapter (snip) with exactly the trainable count of LoRA r16: full rank at LoRA's size.
Every other setting (steps, lr, batch, replay, target modules) is the job's, the same for all rows.

Writes `benchmarks/results/sparse_adapters.json`:
  {"provenance", "skill", "steps", "rows": [{"method", "rule", "keep_fraction", "trainable_params", "accuracy", "general",
   "min", "max", "seeds"}], "target": {...}}
(method `lora` or `sparse`, rule `dense` for LoRA rows, `large-sparse` rows named by `variant`; accuracies 0..1, means
over seeds) and `benchmarks/results/sparse_adapters.png` (accuracy against trainable parameters).

    .venv/bin/python benchmarks/sparse_adapters.py [--seeds 0 1 2] [--output-dir runs/bench-sparse_adapters]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seeded import run_seeds, seed_job, write_job  # noqa: E402

from pipelines.artifacts import Base, Datasets  # noqa: E402
from pipelines.driver import run_job  # noqa: E402
from pipelines.spec import load_job  # noqa: E402
from pipelines.training.experts import METHODS, adapter_deepspeed  # noqa: E402
from pipelines.training.trainer import TrainJob, TrainRequest, run_training  # noqa: E402
from pipelines.inputs import replay_ref  # noqa: E402
from pipelines.runtime import ray_session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "sparse.yaml"
LORA_RANKS = (4, 8, 16)
RULES = ("random", "magnitude", "snip")
KEEP = (0.1, 0.2, 0.4, 0.8)
LARGE_SPARSE_RANK = 16
INPUT_KEYS = ("name", "seed", "output_dir", "base", "tokenizer", "tracking", "testbed", "skills", "train", "trust_remote_code")


def settings() -> list[dict]:
    """Every row's train-section changes, with its labels."""
    out = [{"method": "lora", "rule": "dense", "keep_fraction": None, "variant": f"lora-r{r}",
            "train": {"method": "lora", "lora": {"rank": r, "alpha": 2 * r}}} for r in LORA_RANKS]
    out += [{"method": "sparse", "rule": rule, "keep_fraction": k, "variant": f"{rule}-{k:g}",
             "train": {"method": "sparse", "sparse": {"rule": rule, "keep_fraction": k}}} for rule in RULES for k in KEEP]
    out.append({"method": "sparse", "rule": "snip", "keep_fraction": None, "variant": f"large-sparse-r{LARGE_SPARSE_RANK}",
                "train": {"method": "sparse", "sparse": {"rule": "snip", "match_lora_rank": LARGE_SPARSE_RANK}}})
    return out


def one_seed(base_job: dict, seed: int, output_dir: Path) -> dict[str, dict]:
    """{variant: {"accuracy", "general", "trainable_params"}} for one seed."""
    import torch
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match
    from graft.experts import Expert

    job = {**seed_job(base_job, seed, output_dir, f"sparse-s{seed}", INPUT_KEYS), "recipe": ["testbed"]}  # its inputs only
    path = write_job(job, output_dir, f"sparse-s{seed}")
    board = run_job(load_job(path), path).board
    base, data = board.get(Base), board.get(Datasets)
    skill = base_job["skills"][0]["name"]
    jobs, folders = [], {}
    for row in settings():
        spec = load_job(_job_file(base_job, row, seed, output_dir))
        tr = spec.train
        METHODS[tr.method].precheck(base.model.path, tr, False)
        req = TrainRequest(model=base.model, tokenizer=base.tokenizer, data=data[skill].train, mode=tr.method, steps=tr.steps,
                           batch_size=tr.batch_size, seed=tr.seed, deepspeed=adapter_deepspeed(tr), num_workers=tr.num_workers,
                           threads_per_worker=tr.cpus_per_worker, max_length=tr.max_length,
                           replay=replay_ref(data, tr.replay_data, tr.replay_fraction), replay_fraction=tr.replay_fraction,
                           adapter=METHODS[tr.method].settings(tr))
        folder = output_dir / f"s{seed}" / f"{row['variant']}-{req.key()}"
        folders[row["variant"]] = (folder, tr.method)
        if not (folder / "train_info.json").is_file():
            jobs.append(TrainJob(req, str(folder)))
    if jobs:
        with ray_session(None):  # a private local Ray for this seed's trainings, shut down after them
            run_training(jobs, output_dir / "ray_train", f"sparse-s{seed}", checkpoint_every=10_000, max_failures=0)
    tok = AutoTokenizer.from_pretrained(base.tokenizer.path)
    tests = {s: read_jsonl(data[s].test.path) for s in (skill, "general")}
    torch.set_num_threads(2)
    out = {}
    for variant, (folder, kind) in folders.items():
        model = Expert(folder, kind).load(base.model.path)
        info = json.loads((folder / "train_info.json").read_text())
        out[variant] = {"accuracy": exact_match(model, tok, tests[skill], 12), "general": exact_match(model, tok, tests["general"], 12),
                        "trainable_params": info["trainable_parameters"]}
        print(f"seed {seed} {variant}: {out[variant]}", flush=True)
    return out


def _job_file(base_job: dict, row: dict, seed: int, output_dir: Path) -> Path:
    """The job with the row's train settings merged in, validated like any job (so a bad setting is refused the same way)."""
    job = seed_job(base_job, seed, output_dir, f"sparse-s{seed}", INPUT_KEYS)
    for key, value in row["train"].items():
        job["train"][key] = {**job["train"].get(key, {}), **value} if isinstance(value, dict) else value
    return write_job({**job, "recipe": ["testbed", "train"]}, output_dir, f"row-{row['variant']}-s{seed}")


def summarize(per_seed: dict[int, dict]) -> list[dict]:
    rows = []
    for row in settings():
        v = row["variant"]
        seeds = {str(s): per_seed[s][v] for s in per_seed}
        acc = [r["accuracy"] for r in seeds.values()]
        rows.append({"method": row["method"], "rule": row["rule"], "keep_fraction": row["keep_fraction"], "variant": v,
                     "trainable_params": next(iter(seeds.values()))["trainable_params"],
                     "accuracy": round(sum(acc) / len(acc), 4), "min": min(acc), "max": max(acc),
                     "general": round(sum(r["general"] for r in seeds.values()) / len(seeds), 4), "seeds": seeds})
    return rows


def targets(rows: list[dict]) -> dict:
    """Each sparse row within 2 points of a dense LoRA (mean over seeds) at ≤50% of its trainable parameters."""
    met = []
    for lora in (r for r in rows if r["method"] == "lora"):
        for r in rows:
            if r["method"] == "sparse" and r["trainable_params"] <= 0.5 * lora["trainable_params"] \
                    and r["accuracy"] >= lora["accuracy"] - 0.02:
                met.append({"sparse": r["variant"], "params": r["trainable_params"], "accuracy": r["accuracy"],
                            "lora": lora["variant"], "lora_params": lora["trainable_params"], "lora_accuracy": lora["accuracy"]})
    return {"rule": "a sparse setting within 2 points of a dense LoRA at <= 50% of its trainable parameters", "met": bool(met),
            "pairs": met}


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = {"lora": [r for r in rows if r["method"] == "lora"]}
    for rule in RULES:
        groups[f"sparse {rule}"] = [r for r in rows if r["method"] == "sparse" and r["rule"] == rule and r["keep_fraction"]]
    for (label, mine), style in zip(groups.items(), ("ks-", "o--", "^--", "D-")):
        xs, ys = [r["trainable_params"] for r in mine], [r["accuracy"] for r in mine]
        err = [[y - r["min"] for y, r in zip(ys, mine)], [r["max"] - y for y, r in zip(ys, mine)]]
        ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=label)
    for r in rows:
        if r["keep_fraction"] is None and r["method"] == "sparse":
            ax.errorbar([r["trainable_params"]], [r["accuracy"]], yerr=[[r["accuracy"] - r["min"]], [r["max"] - r["accuracy"]]],
                        fmt="*", markersize=12, capsize=3, label=r["variant"])
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out exact match")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    def finish(per_seed: dict[int, dict], job: dict) -> dict:
        rows = summarize(per_seed)
        return {"skill": job["skills"][0]["name"], "steps": job["train"]["steps"], "rows": rows, "target": targets(rows)}

    out, path = run_seeds(__doc__, JOB, "sparse_adapters", one_seed, finish)
    plot(out["rows"], path.with_suffix(".png"), f"{out['skill']}: accuracy against trainable parameters (mean of seeds, min-max bars)")
    for r in out["rows"]:
        print(json.dumps({k: r[k] for k in ("variant", "trainable_params", "accuracy", "min", "max", "general")}))
    print(json.dumps(out["target"], indent=1))


if __name__ == "__main__":
    main()
