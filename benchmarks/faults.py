"""Faults: hostile, damaged and interrupted inputs through the `graft` command line, as a user meets them.

Runs every case of the fault matrix (tests/fault_matrix.py) as its own `graft` process, then the
scenarios that need real training on a local Ray:
- `graft run` SIGKILLed in the middle of training, then run again: its runs marked KILLED, its
  temporary folders swept, the job finished;
- a DeepSpeed override that turns ZeRO-3 on behind `train.zero_stage: 2` (every tensor partitioned):
  the adapters must be saved whole, and the stage logged as 3;
- the same job without the override: the testbed base must be rebuilt, not reused;
- one training worker SIGKILLed mid-run: training resumes from its last checkpoint and finishes.

    python benchmarks/faults.py [--matrix-only] [--output benchmarks/results/faults.json]

Writes {"cases", "clean_refusals", "tracebacks", "data_lost", "silent_success", "worker_kill_resumed",
"rows": [{"case", "command", "exit_code", "message", "verdict"}], "provenance"}. Target: at least 60
cases, no traceback, no data lost, no silent success, the worker kill resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from benchmarks.provenance import provenance  # noqa: E402
from tests.fault_matrix import CASES, build_world, run_case, run_subprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GRAFT = [sys.executable, "-m", "pipelines.cli"]


def tiny_job(root: Path, **train) -> dict:
    """A whole pipeline run at the smallest sizes that still train through Ray Train + DeepSpeed."""
    return {"name": "faults", "output_dir": str(root / "runs"), "tracking": {"experiment": "faults"},
            "testbed": {"size": "tiny", "pretrain_steps": 30, "pretrain_examples": 1000, "train_examples": 200, "eval_examples": 16},
            "skills": [{"name": "reverse"}], "train": {"steps": 60, "batch_size": 8, "warmup_steps": 2, **train},
            "score": {"examples": 8, "shards": 1}, "evaluate": {"max_new_tokens": 8}}


def graft_run(root: Path, spec: dict, name: str) -> subprocess.CompletedProcess:
    import yaml

    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*GRAFT, "run", str(path)], cwd=root, env=env, capture_output=True, text=True, timeout=1800)


def runs_of(root: Path, experiment: str = "faults") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"]) if exp else []


def row(case: str, command: str, code: int, message: str, verdict: str, detail: str = "") -> dict:
    return {"case": case, "group": "run", "command": command, "exit_code": code, "message": message, "verdict": verdict, "detail": detail}


def killed_driver(root: Path) -> dict:
    """SIGKILL `graft run` (driver and its Ray) while training runs; the next run must clean up and finish."""
    import psutil
    import yaml

    spec = tiny_job(root, steps=400)
    path = root / "killed.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*GRAFT, "run", str(path)], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    for line in proc.stdout:
        if "train/reverse: LoRA" in line:
            break
    time.sleep(15)  # well inside the 400 steps
    tree = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    running = [r.info.run_id for r in runs_of(root) if r.info.status == "RUNNING"]
    leftovers = [str(p) for p in (root / "runs").rglob(".tmp-*") if p.is_dir()]
    again = graft_run(root, tiny_job(root), "killed-again")
    after = {r.info.run_id: r for r in runs_of(root)}
    still = [r for r in running if after[r].info.status == "RUNNING"]
    left = [p for p in leftovers if Path(p).exists()]
    ok = again.returncode == 0 and running and leftovers and not still and not left
    detail = (f"left RUNNING by the kill: {len(running)}, .tmp folders: {len(leftovers)}; after the rerun: "
              f"{len(still)} still RUNNING, {len(left)} .tmp left, exit {again.returncode}")
    return row("graft run SIGKILLed mid-training, then run again", f"graft run {path.name}  (SIGKILL)  then graft run again",
               again.returncode, (again.stderr.strip().splitlines() or [""])[-1], "ok" if ok else "failed", detail)


def zero3_override(root: Path) -> list[dict]:
    """ZeRO-3 switched on by an override while `zero_stage` says 2; then the same job without it."""
    from safetensors import safe_open

    over = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    first = graft_run(root, tiny_job(root, zero_stage=2, deepspeed=over), "zero3")
    runs = runs_of(root)
    train = ([r for r in runs if (r.data.tags.get("graftline.stage"), r.data.tags.get("graftline.item")) == ("train", "reverse")]
             or [None])[-1]
    shapes = []
    if first.returncode == 0 and train is not None:
        with safe_open(str(Path(train.data.tags["graftline.output"]) / "adapter_model.safetensors"), framework="pt") as f:
            shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    whole = bool(shapes) and all(min(s) > 0 for s in shapes)
    stage = train.data.params.get("deepspeed.zero_stage") if train is not None else None
    if first.returncode == 0:
        verdict = "ok" if whole and stage == "3" else "silent_success"
    else:
        verdict = "failed"
    rows = [row("train.deepspeed turns on ZeRO-3 behind zero_stage: 2", "graft run zero3.yaml", first.returncode,
                (first.stderr.strip().splitlines() or [""])[-1], verdict, f"adapter tensor shapes {shapes[:2]}..., logged stage {stage}")]
    second = graft_run(root, tiny_job(root), "zero2")
    runs = runs_of(root)
    bases = [r for r in runs if (r.data.tags.get("graftline.stage"), r.data.tags.get("graftline.item")) == ("testbed", "base-v1")]
    rebuilt = len(bases) >= 2 and bases[-1].data.tags.get("graftline.cached") == "false" \
        and bases[-1].data.tags.get("graftline.key") != bases[-2].data.tags.get("graftline.key")
    rows.append(row("the same job without the override does not reuse the ZeRO-3 base", "graft run zero2.yaml", second.returncode,
                    (second.stderr.strip().splitlines() or [""])[-1],
                    "ok" if second.returncode == 0 and rebuilt else "silent_success" if second.returncode == 0 else "failed",
                    f"testbed/base-v1 keys {[b.data.tags.get('graftline.key') for b in bases]}"))
    return rows


def worker_kill(root: Path) -> dict:
    """One Ray Train worker SIGKILLed after its first checkpoint: the run resumes from it (tests/test_training_resume.py)."""
    from tests.test_training_resume import kill_one_worker_and_train

    t0 = time.time()
    info = kill_one_worker_and_train(root)
    resumed = info.get("resumed_from_step", 0) > 0 and info.get("restarts", 0) >= 1 and info["losses"] == info["steps"]
    return row("a training worker SIGKILLed mid-run", "(in process) run_training with a worker killed through Ray's state API",
               0, json.dumps({k: v for k, v in info.items() if k != "losses"}), "ok" if resumed else "failed",
               f"{time.time() - t0:.0f} s; resumed_from_step {info.get('resumed_from_step')}, steps {info['steps']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "faults.json"))
    p.add_argument("--matrix-only", action="store_true", help="skip the scenarios that train (minutes)")
    args = p.parse_args()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="graft-faults-") as tmp:
        tmp = Path(tmp)
        world = build_world(tmp / "world")
        for i, c in enumerate(CASES):
            outcome = run_case(c, world, tmp / "cases" / f"{i:03d}", run_subprocess)
            rows.append({k: getattr(outcome, k) for k in ("case", "group", "command", "exit_code", "message", "verdict", "detail")})
            print(f"{outcome.verdict:>15}  {c.name}", flush=True)
        worker = None
        if not args.matrix_only:
            for name, scenario in (("killed", killed_driver), ("zero3", zero3_override), ("worker", worker_kill)):
                d = tmp / name
                d.mkdir()
                out = scenario(d)
                for r in out if isinstance(out, list) else [out]:
                    rows.append(r)
                    print(f"{r['verdict']:>15}  {r['case']}  ({r['detail']})", flush=True)
                if name == "worker":
                    worker = out["verdict"] == "ok"
    counts = Counter(r["verdict"] for r in rows)
    result = {
        "cases": len(rows),
        "clean_refusals": counts["clean_refusal"],
        "expected_successes": counts["ok"],
        "tracebacks": counts["traceback"],
        "data_lost": counts["data_lost"],
        "silent_success": counts["silent_success"],
        "other_failures": sum(v for k, v in counts.items() if k not in ("clean_refusal", "ok", "traceback", "data_lost", "silent_success")),
        "worker_kill_resumed": worker,
        "target_met": (len(rows) >= 60 and counts["traceback"] == counts["data_lost"] == counts["silent_success"] == 0
                       and all(r["verdict"] in ("clean_refusal", "ok") for r in rows) and worker is True),
        "rows": [{k: r[k] for k in ("case", "group", "command", "exit_code", "message", "verdict", "detail")} for r in rows],
        "provenance": provenance(seeds=[0], started=started),
    }
    redact = re.compile(re.escape(str(tmp)))
    text = redact.sub("$TMP", json.dumps(result, indent=1))
    Path(args.output).write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("rows", "provenance")}, indent=1))


if __name__ == "__main__":
    main()
