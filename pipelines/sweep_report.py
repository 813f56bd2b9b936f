"""What a sweep leaves behind: the results table (CSV + console), a plot per swept param, and best.yaml.

best.yaml is the original job file's mapping (relative paths as written) with the best trial's params
filled in and no `sweep:` section, validated with `load_job` before the sweep reports success, so
`graft run <output_dir>/<name>/sweep/best.yaml` runs the winner (reusing its cached stage outputs).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipelines.report import format_table
from pipelines.spec import JobSpec, load_job
from pipelines.tracking import RunHandle


@dataclass
class TrialRow:
    """One trial's outcome: its params, its last reported metric and how far it got."""

    trial: str
    params: dict[str, Any]
    value: float | None
    rung: int
    rungs: int
    status: str  # done | stopped at rung k | error
    run_id: str = ""
    error: str = ""


def best_row(rows: Sequence[TrialRow], mode: str) -> TrialRow | None:
    """The best trial among those that finished every rung (a stopped trial's value is on a smaller job)."""
    done = [r for r in rows if r.status == "done" and r.value is not None and not math.isnan(r.value)]
    if not done:
        return None
    return (max if mode == "max" else min)(done, key=lambda r: r.value)


def set_path(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of the nested mapping `data` with the dotted `path` set to `value` (missing levels created)."""
    head, _, rest = path.partition(".")
    return {**data, head: set_path(dict(data.get(head) or {}), rest, value) if rest else value}


def best_job(raw: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The original job mapping with `params` (dotted paths) filled in and without its `sweep:` section."""
    data = {k: v for k, v in raw.items() if k != "sweep"}
    for path, value in params.items():
        data = set_path(data, path, value)
    return data


def write_best_yaml(raw: dict[str, Any], row: TrialRow, metric: str, path: Path) -> Path:
    """Write best.yaml with a header saying where it came from; raises SpecError if it does not validate."""
    header = (f"# Best trial of a graftline sweep: {metric} = {row.value:.4f} (trial {row.trial}, MLflow run {row.run_id}).\n"
              f"# Swept params: {', '.join(f'{k}={v}' for k, v in row.params.items())}\n"
              f"#   graft run {path}\n")
    path.write_text(header + yaml.safe_dump(best_job(raw, row.params), sort_keys=False))
    load_job(path)
    return path


def results_table(rows: Sequence[TrialRow], metric: str) -> tuple[list[str], list[list[str]]]:
    params = list(dict.fromkeys(k for r in rows for k in r.params))
    headers = ["trial", *params, metric, "rungs", "status", "mlflow_run"]
    body = [[r.trial, *(str(r.params.get(p, "")) for p in params), "" if r.value is None else f"{r.value:.4f}",
             f"{r.rung}/{r.rungs}", r.status + (f": {r.error}" if r.error else ""), r.run_id] for r in rows]
    return headers, body


def plot_results(rows: Sequence[TrialRow], metric: str, best: TrialRow | None, path: Path) -> Path:
    """One panel per swept param: the metric of each trial against that param's value (hollow = stopped early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(dict.fromkeys(k for r in rows for k in r.params))
    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.6), squeeze=False)
    for ax, p in zip(axes[0], params):
        values = [r.params.get(p) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = list(dict.fromkeys(str(v) for v in values))
        for r, v in zip(rows, values):
            if r.value is None:
                continue
            x = v if numeric else cats.index(str(v))
            done = r.status == "done"
            ax.scatter([x], [r.value], s=60 if r is best else 30, marker="*" if r is best else "o",
                       facecolors=("C3" if r is best else "C0") if done else "none", edgecolors="C3" if r is best else "C0")
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_xlabel(p)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep: {metric} per trial (★ best, hollow = stopped early)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_sweep(rows: Sequence[TrialRow], raw: dict[str, Any], spec: JobSpec, out: Path, parent: RunHandle,
                 log: Callable[[str], None]) -> Path:
    """Write and log results.csv, results.png and best.yaml to the sweep run; print the table; returns best.yaml."""
    from pipelines.driver import JobError

    sw = spec.sweep
    headers, body = results_table(rows, sw.metric)
    with open(out / "results.csv", "w", newline="") as f:
        csv.writer(f).writerows([headers, *body])
    best = best_row(rows, sw.mode)
    plot_results(rows, sw.metric, best, out / "results.png")
    for name in ("results.csv", "results.png"):
        parent.artifact(out / name, "sweep")
    log("\n" + format_table(headers, body))
    if best is None:
        raise JobError(f"no trial finished every rung; see {out / 'results.csv'}")
    path = write_best_yaml(raw, best, sw.metric, out / "best.yaml")
    parent.artifact(path, "sweep")
    parent.metrics({f"best.{sw.metric}": best.value})
    parent.params({f"best.{k}": v for k, v in best.params.items()})
    parent.tags({"graftline.best_trial": best.trial, "graftline.best_run": best.run_id})
    log(f"\nbest: {sw.metric} = {best.value:.4f} with {best.params} → {path}")
    return path
