"""The driver: runs a job's recipe, stage by stage, on Ray, under one MLflow parent run, then summarises.

Stages hand each other typed artifacts through the run's board (`pipelines.artifacts.Board`): each
stage takes what it reads from it and the driver adds what it writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import Board, Report
from pipelines.context import RunContext, StageResult
from pipelines.plan import Node, local_node, require_fit
from pipelines.recipes import Recipe, check_job
from pipelines.runtime import ray_session
from pipelines.spec import COMMON_FIELDS, JobSpec
from pipelines.tracking import SUBMISSION_TAG, Tracker, default_tracking_uri


class JobError(RuntimeError):
    """A job that failed while running; its message is the one line the CLI prints."""


def resolve_tracking_uri(spec: JobSpec, env_uri: str | None) -> str:
    """The spec's URI, else the caller's environment (MLFLOW_TRACKING_URI), else sqlite under output_dir."""
    return spec.tracking.uri or env_uri or default_tracking_uri(spec.output_dir)


@dataclass
class JobRun:
    """A finished job: each stage's result (folders, keys, metrics, seconds) and every artifact the stages wrote."""

    recipe: Recipe
    results: dict[str, StageResult]
    board: Board


def job_params(spec: JobSpec, recipe: Recipe) -> dict[str, Any]:
    """The job as MLflow params: its common fields and only the sections its recipe's stages read, nulls left out."""
    return spec.model_dump(mode="json", include={*COMMON_FIELDS, *recipe.sections()}, exclude_none=True)


def run_job(spec: JobSpec, job_file: Path, *, address: str | None = None, force: frozenset[str] = frozenset(),
            env_tracking_uri: str | None = None, log: Callable[[str], None] = print, node: Node | None = None,
            submission_id: str | None = None) -> JobRun:
    """Run the stages of `spec`'s recipe in order; stages whose outputs are complete for the same key are reused.

    `submission_id` (a Ray Jobs submission, passed by `graft submit` on the entrypoint's command line) becomes the
    parent run's `graftline.ray_submission_id` tag, by which `graft status ID` finds the run.

    First, before Ray starts, every stage is checked against the cluster's largest node (`node`, default this machine:
    `pipelines.plan.local_node`): a stage that cannot fit is refused with one line (PlanError), as `graft plan` shows."""
    recipe = check_job(spec, str(job_file))
    log(f"graftline: job {spec.name!r} ({job_file}), recipe {recipe.name!r}: checking each stage fits, then starting Ray…")
    unknown = force - {*recipe.stages, "all"}
    if unknown:
        raise JobError(f"--force: no stage {sorted(unknown)[0]!r} in recipe {recipe.name!r}; its stages: "
                       f"{', '.join(recipe.stages)}, all")
    require_fit(spec, recipe, str(job_file), node or local_node())
    root = (spec.output_dir / spec.name).resolve()
    uri = resolve_tracking_uri(spec, env_tracking_uri)
    run = JobRun(recipe, {}, Board())
    stages = recipe.modules()
    with job_session(spec, address, uri, root, log) as (resources, tracker):
        with tracker.run(spec.name, tags={"graftline.job_file": str(job_file), "graftline.root": str(root),
                                          "graftline.recipe": recipe.name,
                                          **({SUBMISSION_TAG: submission_id} if submission_id else {})}) as parent:
            log(f"graftline: job {spec.name!r}, recipe {recipe.name!r} → {root}   (MLflow {uri}, run {parent.run_id})")
            parent.params(job_params(spec, recipe))
            parent.artifact(job_file, "job")
            parent.tags({"graftline.ray_cpus": resources.get("CPU", 0), "graftline.ray_gpus": resources.get("GPU", 0),
                         "graftline.stages": ",".join(recipe.stages), **run_description(spec, recipe, job_file)})
            ctx = RunContext(spec, job_file, root, tracker, parent, force, run.board, log,
                             order={s: i for i, s in enumerate(recipe.stages, 1)})
            for i, stage in enumerate(stages, 1):
                log(f"[{i}/{len(stages)}] {stage.NAME}")
                t0 = time.time()
                res = stage.run(ctx)
                res.seconds = time.time() - t0
                _hand_on(stage, res, run.board)
                run.results[stage.NAME] = res
                parent.metrics({f"stage_seconds.{stage.NAME}": res.seconds})
            summary = summary_table(run.results)
            warnings = [f"warning: {r.name}: {w}" for r in run.results.values() for w in r.warnings]
            parent.text("\n".join([summary, *warnings]), "summary.txt")
            log("\n" + summary)
            if run.board.has(Report):
                from pipelines.report import accuracy_table, general_drops

                table = run.board.get(Report).table
                log("\n" + accuracy_table(table, general_drops(table)))
            if warnings:
                parent.tags({"graftline.warning": "; ".join(warnings)[:5000]})
                log("\n" + "\n".join(warnings))
    return run


def code_commit() -> str:
    """The commit of the graftline checkout running this job, or why there is none."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return out.stdout.strip() if out.returncode == 0 else "unknown (not a git checkout)"


def run_description(spec: JobSpec, recipe: Recipe, job_file: Path) -> dict[str, str]:
    """The parent run's description (shown at the top of the run in the MLflow UI), user and code commit."""
    import getpass

    skills = ", ".join(s.name for s in spec.skills) or "none"
    note = (f"graftline job `{spec.name}` from `{job_file}`: recipe `{recipe.name}` ({' → '.join(recipe.stages)}). "
            f"{recipe.description}. Base `{spec.base}`; skills: {skills}; seed {spec.seed}.")
    commit = code_commit()
    return {"mlflow.note.content": note, "mlflow.user": getpass.getuser(), "graftline.code_commit": commit,
            **({"mlflow.source.git.commit": commit} if not commit.startswith("unknown") else {})}


def _hand_on(stage, result: StageResult, board: Board) -> None:
    """Put what a stage wrote on the board, after checking it wrote exactly what it declares."""
    wrote = sorted(type(a).__name__ for a in result.artifacts)
    declared = sorted(k.__name__ for k in stage.WRITES)
    if wrote != declared:
        raise JobError(f"stage {stage.NAME!r} wrote {wrote}, but declares {declared}")
    board.put(*result.artifacts)


@contextmanager
def job_session(spec: JobSpec, address: str | None, uri: str, folder: Path,
                log: Callable[[str], None]) -> Iterator[tuple[dict, Tracker]]:
    """Ray connected and the job checked against its resources; only then `folder` and the MLflow tracker
    are made, and this job's runs left RUNNING by a process that is gone are marked KILLED."""
    with ray_session(address) as resources:
        require_cpus(spec, address, resources)
        folder.mkdir(parents=True, exist_ok=True)
        log(f"graftline: Ray is up ({int(resources.get('CPU', 0))} CPUs, {int(resources.get('GPU', 0))} GPUs); opening MLflow at {uri}…")
        tracker = Tracker(uri, spec.tracking.experiment, artifact_root=spec.output_dir / "mlartifacts", job=spec.name)
        for run_id in tracker.close_stale_runs():
            log(f"graftline: marked run {run_id} KILLED: it was left RUNNING by a process that is gone")
        yield resources, tracker


def require_cpus(spec: JobSpec, address: str | None, resources: dict) -> None:
    """Fail early when a local Ray cannot ever fit the job's training worker group."""
    need = max(spec.train.num_workers, spec.testbed.num_workers) * spec.train.cpus_per_worker
    if address is None and resources.get("CPU", 0) < need:
        raise JobError(f"train.num_workers × train.cpus_per_worker = {need} CPUs, but this machine has "
                       f"{int(resources.get('CPU', 0))}")


SUMMARY_WIDTH = 100
METRICS_PER_ITEM = 5


def summary_table(results: dict[str, StageResult], width: int = SUMMARY_WIDTH) -> str:
    """Per stage: seconds, items reused, where its outputs are; under it every item with its first metrics, wrapped to
    `width` columns."""
    import textwrap

    lines = []
    for name, r in results.items():
        folders = sorted({str(p.parent) for p in r.outputs.values()})
        where = folders[0] if len(folders) == 1 else f"{len(folders)} folders" if folders else ""
        head = f"{name:<12} {r.seconds:>7.1f} s   reused {r.cached}/{len(r.outputs)}   "
        if len(head) + len(where) > width:  # the folder's tail says which it is
            where = "…" + where[len(head) + len(where) - width + 1:]
        lines.append((head + where).rstrip())
        by_item: dict[str, list[str]] = {item: [] for item in r.outputs}
        for key, value in r.metrics.items():
            item, _, metric = key.partition(".")
            by_item.setdefault(item, []).append(f"{metric or item}={value:.3g}")
        for item, metrics in by_item.items():
            text = f"{item}: " + ", ".join(metrics[:METRICS_PER_ITEM]) if metrics else item
            lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ", break_on_hyphens=False)
    return "\n".join(lines)
