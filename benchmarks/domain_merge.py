"""The domain + language merge study (methods.md §4): does any merge carry a vocabulary into a second language?

Per seed (each its own testbed), `jobs/merge_study.yaml` runs through the pipeline: from base-v1, a "language"
expert (full fine-tune on `general_ja`, general data in the second language's surface form) and a "domain" expert
(full fine-tune on `vocab`, the invented vocabulary in the first language); merged by linear, task arithmetic,
SLERP, TIES and DARE-TIES, and by a DARE-TIES whose weights and densities a Ray Tune search (CMA-ES) picks on dev
rows; against the vocabulary's SkillPack grafted into the language expert (additive and routed). Every model is
measured on held-out rows of the vocabulary asked in the second language (`vocab_ja`, which no model was trained
on), in the first (`vocab`), and on `general` (and `general_ja`, whether the language survived).

Writes `benchmarks/results/domain_merge.json`:
  {"provenance", "job", "rows": [{"method", "vocab_accuracy_lang2", "vocab_accuracy_lang1", "general", "general_lang2",
   "seeds", "min": {...}, "max": {...}}], "references": [the same for base, language, domain, and
   domain_pack: the vocabulary's pack in the base it was made for], "evolved": {SEED: best
   config}, "seeds": {SEED: {method: row}}}
(accuracies 0..1, means over seeds with their min and max) and `benchmarks/results/domain_merge.png`.

    .venv/bin/python benchmarks/domain_merge.py [--seeds 0 1 2] [--output-dir runs/bench-domain_merge]
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
JOB = REPO / "jobs" / "merge_study.yaml"
COLUMNS = ("vocab_accuracy_lang2", "vocab_accuracy_lang1", "general", "general_lang2")
METHODS = ("linear", "task_arithmetic", "slerp", "ties", "dare_ties", "evolved_dare_ties", "graft_additive", "graft_routed")
REFERENCES = ("base", "language", "domain", "domain_pack")


def one_seed(base_job: dict, seed: int, output_dir: Path) -> dict:
    job = seed_job(base_job, seed, output_dir, f"merge-study-s{seed}")
    path = write_job(job, output_dir, f"merge-study-s{seed}")
    run = run_job(load_job(path), path)
    folder = Path(run.board.get(Report).folder.path)
    rows = {r["method"]: {c: r[c] for c in COLUMNS} for r in json.loads((folder / "rows.json").read_text())}
    (evolved,) = (folder.parents[1] / "evolve").glob("evolved_dare_ties-*")
    best = json.loads((evolved / "trials.json").read_text())["best"]
    return {"rows": rows, "evolved": {"params": best["params"], "dev": best["dev"], "dev_mean": best["dev_mean"]}}


def summarize(per_seed: dict[int, dict], names: tuple[str, ...]) -> list[dict]:
    out = []
    for name in names:
        values = {c: [s["rows"][name][c] for s in per_seed.values()] for c in COLUMNS}
        out.append({"method": name, **{c: round(sum(v) / len(v), 4) for c, v in values.items()}, "seeds": len(per_seed),
                    "min": {c: min(v) for c, v in values.items()}, "max": {c: max(v) for c, v in values.items()}})
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(COLUMNS)
    for i, col in enumerate(COLUMNS):
        xs = [j + i * width for j in range(len(rows))]
        ys = [r[col] for r in rows]
        err = [[y - r["min"][col] for y, r in zip(ys, rows)], [r["max"][col] - y for y, r in zip(ys, rows)]]
        ax.bar(xs, ys, width, yerr=err, capsize=2, label=col)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["method"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("held-out exact match")
    ax.set_title(f"vocab (domain) merged or grafted into general_ja (language): mean over {rows[0]['seeds']} seeds, min-max bars",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    def finish(per_seed: dict[int, dict], job: dict) -> dict:
        return {"rows": summarize(per_seed, METHODS), "references": summarize(per_seed, REFERENCES),
                "evolved": {str(k): v["evolved"] for k, v in per_seed.items()},
                "seeds": {str(k): v["rows"] for k, v in per_seed.items()}}

    out, path = run_seeds(__doc__, JOB, "domain_merge", one_seed, finish)
    plot(out["references"] + out["rows"], path.with_suffix(".png"))
    for r in out["references"] + out["rows"]:
        print(json.dumps({k: r[k] for k in ("method", *COLUMNS)}))


if __name__ == "__main__":
    main()
