"""MLflow tracking: one parent run per job, a child run per stage × item, FAILED runs with their error.

Uses `MlflowClient` against an explicit tracking URI (no process-wide MLflow state), so the same
code logs to the local sqlite default, a tracking server, or any URI a job names.

Every run carries the job's name and the process that opened it (host, pid, start time). A run
left RUNNING by a process that no longer exists (a SIGKILLed driver) is marked KILLED the next time
a job of the same name starts (`Tracker.close_stale_runs`).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

MAX_PARAM_CHARS = 6000
JOB_TAG, OWNER_TAG = "graftline.job", "graftline.owner"
# The Ray Jobs submission id of the job whose parent run carries it (`graft run --submission-id`, set by `graft submit`).
SUBMISSION_TAG = "graftline.ray_submission_id"


def process_identity(pid: int | None = None) -> str:
    """`host:pid:start-time` of a process (this one by default): a pid reused by a later process differs."""
    import psutil

    proc = psutil.Process(pid if pid is not None else os.getpid())
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


def owner_gone(identity: str) -> bool:
    """Whether the process named by `identity` (see `process_identity`) is known to be gone.

    Only a process on this host can be checked; one elsewhere is never declared gone.
    """
    import psutil

    host, _, rest = identity.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        return process_identity(int(pid)) != identity
    except psutil.Error:
        return True


def default_tracking_uri(output_dir: Path) -> str:
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{'train.lora.rank': '8', ...} from a nested mapping, values as MLflow param strings."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v, default=str) if not isinstance(v, str) else v
            out[key] = text[:MAX_PARAM_CHARS]
    return out


@dataclass
class RunHandle:
    """One MLflow run: log params, metrics, tags and artifacts to it."""

    client: MlflowClient
    run_id: str

    def params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i:i + 500])

    def tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def table(self, rows: Sequence[Mapping[str, Any]], name: str) -> None:
        """Rows of one table as an MLflow table artifact (`name`, a .json file): the UI shows it as a grid."""
        columns = list(dict.fromkeys(k for row in rows for k in row))
        self.client.log_table(self.run_id, {c: [row.get(c) for row in rows] for c in columns}, name)


EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "finetuning"


class Tracker:
    """Creates and closes the runs of one job in one MLflow experiment."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None = None, job: str | None = None) -> None:
        self.uri, self.job = uri, job
        self.client = MlflowClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            # MLflow 3's UI opens an experiment in its GenAI view unless its kind says otherwise; set only on one made here
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                               tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            self.experiment_id = exp.experiment_id

    @contextmanager
    def run(self, name: str, parent: RunHandle | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
        """A run that ends FINISHED, or FAILED with the error text when the block raises."""
        all_tags = {"mlflow.runName": name, OWNER_TAG: process_identity(), **({JOB_TAG: self.job} if self.job else {}), **(tags or {})}
        if parent is not None:
            all_tags["mlflow.parentRunId"] = parent.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()})
        handle = RunHandle(self.client, run.info.run_id)
        try:
            yield handle
        except BaseException as e:
            message = f"{type(e).__name__}: {e}".strip()
            try:
                handle.tags({"graftline.error": message[:4000]})
                handle.text(message, "error.txt")
            finally:
                self.client.set_terminated(handle.run_id, "FAILED" if not isinstance(e, KeyboardInterrupt) else "KILLED")
            raise
        self.client.set_terminated(handle.run_id, "FINISHED")

    def close_stale_runs(self) -> list[str]:
        """Mark KILLED this job's runs left RUNNING by a process that is gone; returns their ids."""
        if not self.job:
            return []
        runs = self.client.search_runs([self.experiment_id], max_results=5000,
                                       filter_string=f"tags.`{JOB_TAG}` = '{self.job}' and attributes.status = 'RUNNING'")
        stale = [r for r in runs if owner_gone(r.data.tags.get(OWNER_TAG, ""))]
        for r in stale:
            message = f"the process that ran it ({r.data.tags.get(OWNER_TAG)}) is gone (killed or crashed)"
            self.client.set_tag(r.info.run_id, "graftline.error", message)
            self.client.set_terminated(r.info.run_id, "KILLED")
        return [r.info.run_id for r in stale]


def write_json_artifact(run: RunHandle, obj: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, name)
        Path(path).write_text(json.dumps(obj, indent=1, default=str))
        run.artifact(path)


# the runs table oldest first: each job's run, and once it is opened (its `+`) its child runs, in pipeline order. (Sorted by
# name, `01 testbed/...` first, the UI lists the runs flat, without their parents: MLflow nests child runs only
# under a sort by start time.)
RUNS_IN_PIPELINE_ORDER = "orderByKey=attributes.start_time&orderByAsc=true"


def ui_link(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """Where the MLflow UI at `base_url` shows an experiment's runs in pipeline order, or one run of it."""
    fragment = f"#/experiments/{experiment_id}/runs/{run_id}" if run_id else f"#/experiments/{experiment_id}/runs?{RUNS_IN_PIPELINE_ORDER}"
    return f"{base_url.rstrip('/')}/{fragment}"
