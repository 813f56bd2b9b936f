"""`graft sweep`: a Ray Tune search over a job's train → score → pack → graft → evaluate stages.

The base and testbed are built once, on the driver, through the normal `testbed` stage (child runs of
the sweep's MLflow run). Each Tune trial applies its params to the job (re-validated by `parse_job`,
so a bad value fails with the usual one-line error), then runs the other stages with a RunContext
whose parent is the trial's MLflow run, itself a child of the sweep run. Stage outputs live in the
job's content-keyed cache, so trials with equal sections share outputs (two `pack.energy` values
train each adapter once) and `graft run best.yaml` afterwards reuses the winner's outputs.

Intermediate results (what ASHA stops on): with `scheduler: asha` a trial runs in rungs of skills.
Rung k is the job restricted to its first k skills (the skills a per-cell metric names go first,
the rest in job order); the trial trains only the new skill, grafts the k skills, evaluates, and
reports the real metric of that k-skill job (an aggregate is taken over the k skills). The last rung
is the whole job. So every report is an honest value of the metric on a smaller job, all trials are
compared at the same rung, and a stopped trial never trains its remaining skills. Trials stop only
between rungs, when no Ray Train run is in flight. With `scheduler: none` a trial runs the whole
job once and reports once.

Resources: a trial holds no CPU (its placement group asks only for a little memory) and runs each
rung in a plain Ray task outside that placement group, because Tune makes a trial's child tasks
inherit its placement group and the stages' Ray Train workers and Ray tasks need the cluster's CPUs.
`max_concurrent` (default: cluster CPUs // (train.num_workers × cpus_per_worker)) keeps trials from
starving each other's training. Trials that run at once and build the same stage item both build
it (the last rename wins); keep `max_concurrent: 1` on small machines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.context import RunContext
from pipelines.driver import job_params, job_session, resolve_tracking_uri
from pipelines.spec import JobSpec, SpecError, parse_job
from pipelines.artifacts import Board, Report
from pipelines.recipes import recipe_of
from pipelines.stages import testbed
from pipelines.sweep_metrics import metric_needs, metric_value
from pipelines.sweep_report import TrialRow, report_sweep, set_path
from pipelines.tracking import RunHandle, Tracker

# search-space kind (pipelines.spec.SEARCH_SPACES) → the ray.tune domain for its values
TUNE_SPACES: dict[str, Callable[[Any], Any]] = {
    "choice": lambda v: _tune().choice(v),
    "grid": lambda v: _tune().grid_search(v),
    "uniform": lambda v: _tune().uniform(*v),
    "loguniform": lambda v: _tune().loguniform(*v),
}


def _tune():
    from ray import tune

    return tune


def _asha(sweep, rungs: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="rung", max_t=rungs, grace_period=min(sweep.grace_period, rungs),
                         reduction_factor=sweep.reduction_factor)


@dataclass(frozen=True)
class Scheduler:
    """A `sweep.scheduler` choice: how to build it, and whether trials report per rung of skills."""

    build: Callable[[Any, int], Any]
    rungs: bool


SCHEDULERS: dict[str, Scheduler] = {"asha": Scheduler(_asha, rungs=True), "none": Scheduler(lambda sweep, rungs: None, rungs=False)}


def plain(value: Any) -> Any:
    """A Tune-sampled value as plain YAML/JSON data (numpy scalars → Python numbers)."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value.item() if hasattr(value, "item") else value


def apply_params(job: dict[str, Any], params: dict[str, Any], source: str) -> JobSpec:
    """The job (a YAML-level mapping, without `sweep`) with `params` filled in, validated by `parse_job`."""
    data = dict(job)
    data.pop("sweep", None)
    for path, value in params.items():
        data = set_path(data, path, plain(value))
    return parse_job(data, source)


def rungs_of(spec: JobSpec) -> list[list[str]]:
    """The skill sets trials report on: prefixes of the job's skills, metric-named skills first, each in job order."""
    names = [s.name for s in spec.skills]
    if not SCHEDULERS[spec.sweep.scheduler].rungs:
        return [names]
    first = [n for n in metric_needs(spec.sweep.metric) if n in names]
    order = first + [n for n in names if n not in first]
    return [[n for n in names if n in order[:k]] for k in range(max(1, len(first)), len(names) + 1)]


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, as plain values (Tune ships it to the trial with `with_parameters`)."""

    job: dict[str, Any]  # the validated job, YAML-level, without `sweep`
    source: str
    job_file: str
    cwd: str  # relative paths in the job are relative to where `graft sweep` ran
    root: str
    tracking_uri: str
    experiment: str
    sweep_run_id: str
    inputs: list[object]  # what the testbed stage wrote (Base, Datasets, Models), shared by every trial
    rungs: list[list[str]]
    metric: str


def run_rung(setup: TrialSetup, params: dict[str, Any], skills: list[str], parent_run_id: str) -> dict[str, dict[str, float]]:
    """Stages train → evaluate for the job restricted to `skills`, under MLflow run `parent_run_id` (a Ray task)."""
    os.chdir(setup.cwd)
    spec = apply_params(setup.job, params, setup.source)
    # a trial's graft is one point of the search, not a model to serve: `graft run` of the best job registers the winner
    spec = spec.model_copy(update={"skills": [s for s in spec.skills if s.name in skills],
                                   "tracking": spec.tracking.model_copy(update={"register_model": False})})
    tracker = Tracker(setup.tracking_uri, setup.experiment, job=setup.job["name"])
    ctx = RunContext(spec, Path(setup.job_file), Path(setup.root), tracker, RunHandle(tracker.client, parent_run_id),
                     frozenset(), Board(setup.inputs), lambda line: print(line, flush=True))
    for stage in recipe_of(spec.recipe).modules():
        if stage is not testbed:
            ctx.board.put(*stage.run(ctx).artifacts)
    return ctx.board.get(Report).table


def sweep_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: its params on the job, rung by rung, each rung's metric reported to Tune and MLflow."""
    import ray
    from ray import tune

    params = {k: plain(v) for k, v in config.items()}
    apply_params(setup.job, params, setup.source)  # fail here, before any run is opened, on a bad value
    tracker = Tracker(setup.tracking_uri, setup.experiment, job=setup.job["name"])
    trial = tune.get_context().get_trial_name()
    rung_task = ray.remote(num_cpus=0)(run_rung).options(scheduling_strategy="DEFAULT")  # outside the trial's group
    with tracker.run(trial, parent=RunHandle(tracker.client, setup.sweep_run_id),
                     tags={"graftline.sweep_trial": trial, "graftline.rungs": len(setup.rungs)}) as run:
        run.params(params)
        for k, skills in enumerate(setup.rungs, 1):
            if len(setup.rungs) == 1:
                table = ray.get(rung_task.remote(setup, params, skills, run.run_id))
            else:
                with tracker.run(f"{trial}/rung-{k}", parent=run, tags={"graftline.rung": k, "graftline.skills": ",".join(skills)}) as rr:
                    table = ray.get(rung_task.remote(setup, params, skills, rr.run_id))
            value = metric_value(setup.metric, table, skills)
            run.metrics({setup.metric: value, "rung": k}, step=k)
            try:
                tune.report({setup.metric: value, "rung": k, "skills": len(skills), "mlflow_run_id": run.run_id})
            except SystemExit:  # how Tune ends a trial it stops (ASHA: after any rung, the last one included)
                if k < len(setup.rungs):
                    run.tags({"graftline.stopped": f"early, after rung {k} of {len(setup.rungs)} (scheduler)"})
                return


def default_concurrency(spec: JobSpec, cpus: float) -> int:
    """Trials that can train at once without waiting on each other's Ray Train workers."""
    return max(1, int(cpus) // (spec.train.num_workers * spec.train.cpus_per_worker))


def run_sweep(spec: JobSpec, job_file: Path, *, address: str | None = None, env_tracking_uri: str | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Build the testbed once, run the Tune search, write best.yaml / results.csv / results.png; returns best.yaml."""
    import yaml

    if spec.sweep is None:
        raise SpecError([f"{job_file}: sweep: missing; a sweep needs a `sweep:` section (see jobs/sweep-demo.yaml)"])
    sw = spec.sweep
    recipe = recipe_of(spec.recipe)
    if recipe.stages[0] != testbed.NAME:
        raise SpecError([f"{job_file}: recipe: a sweep builds the `testbed` stage once and runs the rest per trial; "
                         f"recipe {recipe.name!r} starts with {recipe.stages[0]!r}"])
    root = (spec.output_dir / spec.name).resolve()
    out = root / "sweep"
    uri = resolve_tracking_uri(spec, env_tracking_uri)
    job = spec.model_dump(mode="json", exclude={"sweep"}, exclude_unset=False)
    rungs = rungs_of(spec)
    with job_session(spec, address, uri, out, log) as (resources, tracker):
        with tracker.run(f"{spec.name}-sweep", tags={"graftline.job_file": str(job_file), "graftline.root": str(root),
                                                     "graftline.sweep": "parent"}) as parent:
            log(f"graftline: sweep of job {spec.name!r} → {out}   (MLflow {uri}, run {parent.run_id})")
            parent.params({**job_params(spec, recipe), "sweep": spec.sweep.model_dump(mode="json")})
            parent.artifact(job_file, "job")
            concurrent = sw.max_concurrent or default_concurrency(spec, resources.get("CPU", 0))
            log("[1/2] testbed (once for every trial)")
            t0 = time.time()
            ctx = RunContext(spec, job_file, root, tracker, parent, frozenset(), Board(), log)
            prep = testbed.run(ctx).artifacts
            parent.metrics({"stage_seconds.testbed": time.time() - t0})
            setup = TrialSetup(job, str(job_file), str(job_file.resolve()), os.getcwd(), str(root), uri,
                               spec.tracking.experiment, parent.run_id, prep, rungs, sw.metric)
            log(f"[2/2] trials: {sw.metric} ({sw.mode}), scheduler {sw.scheduler}, rungs "
                f"{[len(r) for r in rungs]} skills, at most {concurrent} at once")
            results = _tune_fit(setup, spec, concurrent, out)
            parent.tags({"graftline.ray_cpus": resources.get("CPU", 0), "graftline.max_concurrent": concurrent})
            rows = [_row(r, setup) for r in results]
            _close_stopped(tracker, parent)
            raw = yaml.safe_load(job_file.read_text())
            best = report_sweep(rows, raw, spec, out, parent, log)
    return best


def _tune_fit(setup: TrialSetup, spec: JobSpec, concurrent: int, out: Path) -> Any:
    tune = _tune()
    sw = spec.sweep
    trainable = tune.with_resources(tune.with_parameters(sweep_trial, setup=setup), {"memory": 64 * 1024**2})
    tuner = tune.Tuner(
        trainable,
        param_space={path: TUNE_SPACES[kind](values) for path, space in sw.params.items() for kind, values in space.items()},
        tune_config=tune.TuneConfig(metric=sw.metric, mode=sw.mode, num_samples=sw.num_samples, max_concurrent_trials=concurrent,
                                    scheduler=SCHEDULERS[sw.scheduler].build(sw, len(setup.rungs))),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(out / "tune"), verbose=1),
    )
    return tuner.fit()


def _row(result: Any, setup: TrialSetup) -> TrialRow:
    metrics = result.metrics or {}
    rung = int(metrics.get("rung", 0))
    status = "error" if result.error else "done" if rung == len(setup.rungs) else f"stopped at rung {rung}"
    error = str(result.error).strip().splitlines()[-1] if result.error else ""
    return TrialRow(trial=str(metrics.get("trial_id", Path(result.path).name)), params={k: plain(v) for k, v in result.config.items()},
                    value=metrics.get(setup.metric), rung=rung, rungs=len(setup.rungs), status=status,
                    run_id=metrics.get("mlflow_run_id", ""), error=error)


def _close_stopped(tracker: Tracker, parent: RunHandle) -> None:
    """Safety net: a trial run still RUNNING once Tune is done (its process ended without closing it) is marked KILLED."""
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}' "
                                      "and attributes.status = 'RUNNING'")
    for r in runs:
        if "graftline.sweep_trial" in r.data.tags:
            tracker.client.set_tag(r.info.run_id, "graftline.stopped", "ended while running (scheduler or crash)")
            tracker.client.set_terminated(r.info.run_id, "KILLED")

