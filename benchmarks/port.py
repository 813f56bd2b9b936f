"""PortLLM patch porting (methods.md §2): a LoRA patch trained on base-v1, carried to v2 … v5 with no training.

Per seed (each seed its own testbed chain: base-v1, then v2 … v5, each a continued pretraining of the one
before on fresh `general` data), `jobs/port.yaml` runs through the pipeline: a LoRA per skill on base-v1,
the port stage (fit, base drift, the same LoRA trained on every new version as the reference, update gap)
and port_eval. For each skill and new version this reports:
- `zero_shot`: the new base alone; `ported`: new base + the v1 patch, nothing trained; `finetuned`: the
  LoRA trained on the new base;
- `port_seconds` / `finetune_seconds`: making the ported model in a fresh process (imports, loading the
  new base, adding the patch) against training the reference (its Ray Train run's training time);
  `port_peak_mb` / `finetune_peak_mb`: the peak resident memory of the process doing each (that fresh
  process; the rank-0 training worker, which holds one of two data-parallel replicas);
- `delta_drift`: the mean over the patch's modules of ‖θ'_k − θ_k‖_F / ‖θ_k‖_F (how far the base moved
  under the patch), with the update gap ‖Δ' − Δ‖_F / ‖Δ‖_F and the cosine of the reference's update.

Writes `benchmarks/results/port.json`:
  {"provenance", "rows": [{"skill", "base", "zero_shot", "ported", "finetuned", "port_seconds", "finetune_seconds",
   "port_peak_mb", "finetune_peak_mb", "delta_drift", "update_gap", "update_cosine", "seeds": {SEED: {...}}}], "target": {...}}
(accuracies 0..1 held-out exact match, means over seeds) and `benchmarks/results/port.png` (the decay by version, and
ported accuracy against the base's drift).

    .venv/bin/python benchmarks/port.py [--seeds 0 1 2] [--output-dir runs/bench-port]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seeded import run_seeds, seed_job, write_job  # noqa: E402

from pipelines.artifacts import Base, Experts, Ported, Report  # noqa: E402
from pipelines.driver import run_job  # noqa: E402
from pipelines.spec import load_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "port.yaml"
ACCURACIES = ("zero_shot", "ported", "finetuned")
MEASURES = ("port_seconds", "finetune_seconds", "port_peak_mb", "finetune_peak_mb", "delta_drift", "update_gap", "update_cosine")
PORT = """
import resource, sys, time
t0 = time.time()
from graft.experts import Expert
from graft.port import ported_model
ported_model(sys.argv[1], Expert(sys.argv[2], sys.argv[3]).deltas(sys.argv[4]))
print(time.time() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def port_cost(new_base: str, patch: str, kind: str, old_base: str) -> tuple[float, float]:
    """Seconds (imports included) and peak resident memory in MB of a fresh process that builds the ported model."""
    out = subprocess.run([sys.executable, "-c", PORT, new_base, patch, kind, old_base], cwd=REPO, capture_output=True, text=True,
                         check=True)
    seconds, peak = out.stdout.strip().splitlines()[-1].split()
    return float(seconds), float(peak)


def one_seed(base_job: dict, seed: int, output_dir: Path) -> dict[tuple[str, str], dict]:
    path = write_job(seed_job(base_job, seed, output_dir, f"port-s{seed}"), output_dir, f"port-s{seed}")
    run = run_job(load_job(path), path)
    table, ported = run.board.get(Report).table, run.board.get(Ported)
    base, experts = run.board.get(Base), run.board.get(Experts)
    out = {}
    for skill in (s["name"] for s in base_job["skills"]):
        for name, checkpoint in ported.bases.items():
            pair = Ported.pair(skill, name)
            report = json.loads((Path(ported.by_pair[pair].path) / "port.json").read_text())
            info = json.loads((Path(ported.references[pair].path) / "train_info.json").read_text())
            gap = report["update_gap"].values()
            port_seconds, port_peak_mb = port_cost(checkpoint.model.path, experts[skill].path, experts.kind, base.model.path)
            out[(skill, name)] = {
                **{a: table[f"{name}/{a}"][skill] for a in ACCURACIES},
                "general": {a: table[f"{name}/{a}"]["general"] for a in ACCURACIES},
                "port_seconds": port_seconds, "finetune_seconds": info["train_seconds"],
                "port_peak_mb": port_peak_mb, "finetune_peak_mb": info["peak_rss_mb"],
                "delta_drift": sum(report["drift"].values()) / len(report["drift"]),
                "update_gap": sum(g["relative_gap"] for g in gap) / len(gap),
                "update_cosine": sum(g["cosine"] for g in gap) / len(gap),
            }
        out[(skill, "base-v1")] = {"expert": table["base-v1/expert"][skill]}
    return out


def summarize(per_seed: dict[int, dict]) -> list[dict]:
    rows = []
    first = next(iter(per_seed.values()))
    for skill, name in first:
        if name == "base-v1":
            continue
        seeds = {str(s): per_seed[s][(skill, name)] for s in per_seed}
        mean = lambda key, seeds=seeds: round(sum(r[key] for r in seeds.values()) / len(seeds), 4)  # noqa: E731
        rows.append({"skill": skill, "base": name, **{k: mean(k) for k in (*ACCURACIES, *MEASURES)},
                     "general": {a: round(sum(r["general"][a] for r in seeds.values()) / len(seeds), 4) for a in ACCURACIES},
                     "min": {a: min(r[a] for r in seeds.values()) for a in ACCURACIES},
                     "max": {a: max(r[a] for r in seeds.values()) for a in ACCURACIES},
                     "expert_on_v1": round(sum(per_seed[s][(skill, "base-v1")]["expert"] for s in per_seed) / len(per_seed), 4),
                     "seeds": seeds})
    return rows


def targets(rows: list[dict]) -> dict:
    """Ported within 5 points of fine-tuned on base-v2, per skill and seed; the decay from v2 to the last version."""
    out = {}
    for skill in sorted({r["skill"] for r in rows}):
        mine = [r for r in rows if r["skill"] == skill]
        v2 = next(r for r in mine if r["base"] == "base-v2")
        per_seed = {s: round(100 * (v["finetuned"] - v["ported"]), 2) for s, v in v2["seeds"].items()}
        out[skill] = {"v2_points_below_finetuned": per_seed, "met_on_every_seed": all(p <= 5 for p in per_seed.values()),
                      "ported_by_version": {r["base"]: r["ported"] for r in mine},
                      "decay_points_v2_to_last": round(100 * (v2["ported"] - mine[-1]["ported"]), 2)}
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = sorted({r["skill"] for r in rows})
    fig, axes = plt.subplots(1, len(skills) + 1, figsize=(4.5 * (len(skills) + 1), 3.8), squeeze=False)
    for ax, skill in zip(axes[0], skills):
        mine = [r for r in rows if r["skill"] == skill]
        xs = [r["base"] for r in mine]
        for a, style in zip(ACCURACIES, ("o:", "o-", "s--")):
            means = [r[a] for r in mine]
            err = [[m - r["min"][a] for m, r in zip(means, mine)], [r["max"][a] - m for m, r in zip(means, mine)]]
            ax.errorbar(xs, means, yerr=err, fmt=style, capsize=3, label=a)
        ax.set_ylim(-0.02, 1.05)
        ax.set_title(f"{skill}: LoRA patch from base-v1", fontsize=10)
        ax.set_ylabel("held-out exact match")
        ax.legend(fontsize=8)
    drift = axes[0][-1]
    for skill, marker in zip(skills, "os^D"):
        points = [(v["delta_drift"], v["ported"]) for r in rows if r["skill"] == skill for v in r["seeds"].values()]
        drift.plot([p[0] for p in points], [p[1] for p in points], marker, alpha=0.7, label=f"{skill} ported")
    drift.set_xlabel("drift: mean ‖θ' − θ‖ / ‖θ‖ over the patch's modules")
    drift.set_xlim(left=0)
    drift.set_ylim(-0.02, 1.05)
    drift.set_title("ported, by drift (every seed and version)", fontsize=10)
    drift.legend(fontsize=8)
    fig.suptitle("PortLLM on the testbed's version chain (mean of seeds, min-max bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    def finish(per_seed: dict[int, dict], job: dict) -> dict:
        rows = summarize(per_seed)
        return {"rows": rows, "target": targets(rows)}

    out, path = run_seeds(__doc__, JOB, "port", one_seed, finish)
    plot(out["rows"], path.with_suffix(".png"))
    for r in out["rows"]:
        print(json.dumps({k: r[k] for k in ("skill", "base", *ACCURACIES, "delta_drift", "update_gap")}))
    print(json.dumps(out["target"], indent=1))


if __name__ == "__main__":
    main()
