"""The driver: runs a job's stages in order on Ray, under one MLflow parent run, then summarises."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.context import RunContext, StageResult
from pipelines.report import format_table
from pipelines.runtime import ray_session
from pipelines.spec import JobSpec
from pipelines.stages import STAGE_NAMES, STAGES
from pipelines.tracking import Tracker, default_tracking_uri


class JobError(RuntimeError):
    """A job that failed while running; its message is the one line the CLI prints."""


def resolve_tracking_uri(spec: JobSpec, env_uri: str | None) -> str:
    """The spec's URI, else the caller's environment (MLFLOW_TRACKING_URI), else sqlite under output_dir."""
    return spec.tracking.uri or env_uri or default_tracking_uri(spec.output_dir)


def run_job(spec: JobSpec, job_file: Path, *, address: str | None = None, force: frozenset[str] = frozenset(),
            env_tracking_uri: str | None = None, log: Callable[[str], None] = print) -> dict[str, StageResult]:
    """Run every stage of `spec`; stages whose outputs are complete for the same key are reused."""
    unknown = force - {*STAGE_NAMES, "all"}
    if unknown:
        raise JobError(f"--force: unknown stage {sorted(unknown)[0]!r}; stages: {', '.join(STAGE_NAMES)}, all")
    root = (spec.output_dir / spec.name).resolve()
    uri = resolve_tracking_uri(spec, env_tracking_uri)
    results: dict[str, StageResult] = {}
    with job_session(spec, address, uri, root, log) as (resources, tracker):
        with tracker.run(spec.name, tags={"graftline.job_file": str(job_file), "graftline.root": str(root)}) as parent:
            log(f"graftline: job {spec.name!r} → {root}   (MLflow {uri}, run {parent.run_id})")
            parent.params(spec.model_dump(mode="json"))
            parent.artifact(job_file, "job")
            parent.tags({"graftline.ray_cpus": resources.get("CPU", 0), "graftline.ray_gpus": resources.get("GPU", 0)})
            ctx = RunContext(spec, job_file, root, tracker, parent, force, results, log)
            for i, stage in enumerate(STAGES, 1):
                log(f"[{i}/{len(STAGES)}] {stage.NAME}")
                t0 = time.time()
                res = stage.run(ctx)
                res.seconds = time.time() - t0
                results[stage.NAME] = res
                parent.metrics({f"stage_seconds.{stage.NAME}": res.seconds})
            summary = summary_table(results)
            parent.text(summary, "summary.txt")
            log("\n" + summary)
            if "evaluate" in results:
                from pipelines.report import accuracy_table

                log("\n" + accuracy_table(results["evaluate"].info["table"]))
    return results


@contextmanager
def job_session(spec: JobSpec, address: str | None, uri: str, folder: Path,
                log: Callable[[str], None]) -> Iterator[tuple[dict, Tracker]]:
    """Ray connected and the job checked against its resources; only then `folder` and the MLflow tracker
    are made, and this job's runs left RUNNING by a process that is gone are marked KILLED."""
    with ray_session(address) as resources:
        require_cpus(spec, address, resources)
        folder.mkdir(parents=True, exist_ok=True)
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


def summary_table(results: dict[str, StageResult]) -> str:
    rows = []
    for name, r in results.items():
        metrics = ", ".join(f"{k}={v:.3g}" for k, v in list(r.metrics.items())[:4])
        outs = sorted({str(p.parent) for p in r.outputs.values()})
        rows.append([name, f"{r.seconds:.1f}", f"{r.cached}/{len(r.outputs)}", metrics, ", ".join(outs)])
    return format_table(["stage", "seconds", "reused", "key metrics", "outputs"], rows)
