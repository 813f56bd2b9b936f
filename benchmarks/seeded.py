"""What the seeded method benchmarks share: their command line, one pipeline job per seed, and the results file.

Each of `transfer.py`, `port.py`, `sparse_adapters.py` and `transplant.py` runs its job once per seed (each seed
its own testbed), summarises the seeds, and writes one JSON with its provenance (`provenance.py`) and a PNG.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from provenance import provenance

from graft.strict_yaml import load_yaml


def seed_job(base_job: dict, seed: int, output_dir: Path, name: str, keys: tuple[str, ...] | None = None) -> dict:
    """The job at `seed` (its train section's seed too), named `name`, writing under `output_dir`; with `keys`, only those."""
    job = {k: copy.deepcopy(v) for k, v in base_job.items() if keys is None or k in keys}
    job.update(seed=seed, output_dir=str(output_dir), name=name)
    if "train" in job:
        job["train"] = {**job["train"], "seed": seed}
    return job


def write_job(job: dict, folder: Path, stem: str) -> Path:
    """`job` as `folder/stem.yaml`, beside the runs, as a user's job file would be."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def run_seeds(doc: str, job: Path, name: str, one_seed: Callable[[dict, int, Path], dict],
              finish: Callable[[dict[int, dict], dict], dict]) -> tuple[dict, Path]:
    """Parse the command line (--job, --seeds, --output-dir, --out), run `one_seed(job, seed, output_dir)` per seed,
    and write `{"provenance", "job", **finish(per_seed, job)}` to --out; returns it and the path."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--job", default=str(job))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--output-dir", default=f"runs/bench-{name}")
    ap.add_argument("--out", default=f"benchmarks/results/{name}.json")
    args = ap.parse_args()
    started = time.time()
    base_job = load_yaml(Path(args.job).read_text())
    per_seed = {seed: one_seed(base_job, seed, Path(args.output_dir).resolve()) for seed in args.seeds}
    out = {"provenance": provenance(args.seeds, started), "job": str(Path(args.job)), **finish(per_seed, base_job)}
    path = Path(args.out)
    path.write_text(json.dumps(out, indent=1))
    return out, path
