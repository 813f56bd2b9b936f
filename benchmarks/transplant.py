"""ConTrans concept transplantation (methods.md §5): aligned-small's concept vector, mapped into target-large, injected.

Per seed (each its own testbed: base-v1, aligned-small fine-tuned from it to answer in upper case when asked, and
target-large, twice the width and depth, pretrained on `general` with a share of `shout`, so it can answer in upper
case when asked and never does unasked; the concept pairs are `shout:x=` against `copy:x=`), `jobs/transplant.yaml`
runs through the pipeline: the concepts stage takes the source's
concept vector and both models' states on shared prompts, the transplant stage sweeps every target layer × α with a
random direction of the same norm as the control. This reports, per seed and as means:
- `affine_r2_heldout` of the map at the reported layer pair (fitted on 80% of the shared prompts, scored on 20%);
- at α ∈ {0, 1, 2, 5}: the target's behaviour rate (completions with letters, all upper case) on held-out concept
  prompts, its `general` exact match (the completion lower-cased), and the random control's behaviour rate.
The reported layer is the one whose best α shows the behaviour most (the best held-out R² on ties); the whole
sweep is kept under `sweep`.

Writes `benchmarks/results/transplant.json`:
  {"provenance", "affine_r2_heldout", "layer_source", "layer_target", "rows": [{"alpha", "behaviour_rate", "general",
   "random_behaviour_rate", "min", "max"}], "seeds": {SEED: {...}}, "target": {...}}
(rates 0..1, means over seeds) and `benchmarks/results/transplant.png` (behaviour and general against α).

    .venv/bin/python benchmarks/transplant.py [--seeds 0 1] [--output-dir runs/bench-transplant]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from seeded import run_seeds, seed_job, write_job  # noqa: E402

from pipelines.artifacts import Report  # noqa: E402
from pipelines.driver import run_job  # noqa: E402
from pipelines.spec import load_job  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "transplant.yaml"
RATES = ("behaviour_rate", "general", "random_behaviour_rate")


def one_seed(base_job: dict, seed: int, output_dir: Path) -> dict:
    job = seed_job(base_job, seed, output_dir, f"transplant-s{seed}")
    job["transplant"] = {**job["transplant"], "seed": seed}
    path = write_job(job, output_dir, f"transplant-s{seed}")
    run = run_job(load_job(path), path)
    points = run.board.get(Report).table
    by_layer: dict[int, dict[float, dict]] = {}
    for name, p in points.items():
        layer, alpha = name.split("-a")
        by_layer.setdefault(int(layer[1:]), {})[float(alpha)] = p
    layer = max(by_layer, key=lambda la: (max(p["behaviour_rate"] for p in by_layer[la].values()),
                                          next(iter(by_layer[la].values()))["affine_r2_heldout"]))
    folder = Path(run.board.get(Report).folder.path)
    chosen = json.loads((folder / "eval.json").read_text())["chosen"]
    source_layer = json.loads(next((folder.parent).glob(f"L{layer}-a*/point.json")).read_text())["source_layer"]
    rows = [{"alpha": a, **{k: p[k] for k in RATES}} for a, p in sorted(by_layer[layer].items())]
    r2 = by_layer[layer][rows[0]["alpha"]]["affine_r2_heldout"]
    return {"layer_target": layer, "layer_source": int(source_layer), "affine_r2_heldout": r2, "rows": rows, "chosen": chosen,
            "sweep": points}


def summarize(per_seed: dict[int, dict]) -> dict:
    first = next(iter(per_seed.values()))
    rows = []
    for i, row in enumerate(first["rows"]):
        values = {k: [s["rows"][i][k] for s in per_seed.values()] for k in RATES}
        rows.append({"alpha": row["alpha"], **{k: round(sum(v) / len(v), 4) for k, v in values.items()},
                     "min": {k: min(v) for k, v in values.items()}, "max": {k: max(v) for k, v in values.items()}})
    r2 = [s["affine_r2_heldout"] for s in per_seed.values()]
    layers = {(s["layer_source"], s["layer_target"]) for s in per_seed.values()}
    source, target = sorted(layers)[0]
    return {"affine_r2_heldout": round(sum(r2) / len(r2), 4), "layer_source": source, "layer_target": target,
            "layers_by_seed": {str(k): [s["layer_source"], s["layer_target"]] for k, s in per_seed.items()}, "rows": rows}


def targets(summary: dict) -> dict:
    """Behaviour from ≤10% (α = 0) to ≥80% at some α with `general` down ≤5 points, the random control ≤10%."""
    rows = summary["rows"]
    zero = next(r for r in rows if r["alpha"] == 0)
    hits = [r["alpha"] for r in rows if r["alpha"] != 0 and r["behaviour_rate"] >= 0.8 and r["general"] >= zero["general"] - 0.05]
    return {"behaviour_at_0": zero["behaviour_rate"], "best_behaviour": max(r["behaviour_rate"] for r in rows),
            "alphas_meeting_it": hits, "random_control_max": max(r["random_behaviour_rate"] for r in rows),
            "met": bool(hits) and zero["behaviour_rate"] <= 0.1 and max(r["random_behaviour_rate"] for r in rows) <= 0.1}


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    xs = [r["alpha"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in zip(RATES, ("o-", "s--", "^:")):
        ys = [r[key] for r in rows]
        err = [[y - r["min"][key] for y, r in zip(ys, rows)], [r["max"][key] - y for y, r in zip(ys, rows)]]
        ax.errorbar(xs, ys, yerr=err, fmt=style, capsize=3, label=key)
    ax.set_ylim(-0.02, 1.05)
    ax.set_xlabel("α")
    ax.set_ylabel("rate (held-out)")
    ax.set_title(f"ConTrans on the testbed: source layer {summary['layer_source']} → target layer {summary['layer_target']} "
                 f"(map R² {summary['affine_r2_heldout']:.2f})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    def finish(per_seed: dict[int, dict], job: dict) -> dict:
        summary = summarize(per_seed)
        return {**summary, "target": targets(summary), "seeds": {str(k): v for k, v in per_seed.items()}}

    out, path = run_seeds(__doc__, JOB, "transplant", one_seed, finish)
    plot(out, path.with_suffix(".png"))
    for r in out["rows"]:
        print(json.dumps({k: r[k] for k in ("alpha", *RATES)}))
    print(json.dumps(out["target"], indent=1))


if __name__ == "__main__":
    main()
