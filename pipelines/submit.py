"""Submitting graftline jobs to a running Ray cluster through its Jobs API, and following them.

`graft submit JOB.yaml --address http://HEAD:8265` validates the job spec here, ships the working
directory (the code the cluster runs) as the job's runtime_env `working_dir`, and starts
`python -m pipelines.cli run JOB.yaml --address auto` as the job's driver on the head node.
`graft status|logs|stop ID` talk to the same API.

Token auth: a cluster started with `RAY_AUTH_MODE=token` answers 401 unless this process also has
`RAY_AUTH_MODE=token` and the cluster's token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
`~/.ray/auth_token`). The token is never put into the job's runtime_env: the cluster has its own.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.spec import JobSpec, load_job

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never shipped: environments, outputs, caches, weights. Patterns follow .gitignore syntax (Ray's own
# matcher); Ray also honours the working directory's .gitignore and .rayignore.
DEFAULT_EXCLUDES = (
    ".git", ".venv", "venv", "runs/", "mlruns/", "mlartifacts/", "ray_results/", "mlflow.db", "*.db",
    "__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info", "build/", "dist/",
    "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.zip", "*.tar.gz",
)
# Passed from this shell to the job when set: where the job logs to.
PASSED_ENV = ("MLFLOW_TRACKING_URI",)
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
AUTH_HINT = ("the cluster requires token auth: set RAY_AUTH_MODE=token and give its token in RAY_AUTH_TOKEN, "
             "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")


class SubmitError(RuntimeError):
    """A submission or query that failed; its message is the one line the CLI prints."""


def resolve_address(address: str | None) -> str:
    """The Jobs API URL: `address`, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS; `http://` added if bare."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("--address: give the cluster's dashboard URL, e.g. http://127.0.0.1:8265 (or set RAY_ADDRESS)")
    if address == "auto" or address.startswith("ray://"):
        raise SubmitError(f"--address: {address!r} is a Ray client address; the Jobs API is the dashboard URL, "
                          "e.g. http://127.0.0.1:8265")
    return address if re.match(r"^https?://", address) else f"http://{address}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if "Authentication" in text or "status code 401" in text or "status code 403" in text:
        return f"{first.rstrip(':')}: {AUTH_HINT}"
    return first


def connect(address: str | None) -> tuple[JobSubmissionClient, str]:
    """A Jobs API client for the cluster at `address` (one-line SubmitError when unreachable or refused)."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    try:
        return JobSubmissionClient(url), url
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray Jobs API at {url} ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - auth and version errors arrive as several exception types
        raise SubmitError(f"Ray Jobs API at {url}: {_one_line(e)}") from None


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def validate_for_cluster(job: Path, working_dir: Path) -> tuple[JobSpec, str, list[str]]:
    """Validate `job` as the cluster will see it; return the spec, its path there, and notes for the user.

    Relative paths in a job spec resolve against the driver's working directory, which on the cluster
    is the shipped `working_dir`, so validation runs from there too. Raises SpecError when invalid.
    """
    from pipelines.recipes import check_job

    job_abs = job.resolve()
    with _cwd(working_dir):
        spec = load_job(job_abs)
        check_job(spec, str(job))
    notes = []
    try:
        job_there = job_abs.relative_to(working_dir).as_posix()
    except ValueError:
        job_there = str(job_abs)
        notes.append(f"{job} is outside the working directory {working_dir}: the head node must see it at {job_abs}")
    if not spec.output_dir.is_absolute():
        notes.append(f"{job}: output_dir {str(spec.output_dir)!r} is relative: outputs land in the job's temporary copy "
                     "of the working directory on the head node; use a shared absolute path")
    if spec.tracking.uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        notes.append(f"{job}: MLflow tracking goes to sqlite under output_dir on the head node; "
                     "set MLFLOW_TRACKING_URI (or tracking.uri) to your tracking server")
    return spec, job_there, notes


def entrypoint(job_there: str, force: Sequence[str] = (), python: str = "python") -> str:
    """The driver command the cluster runs; `--address auto` joins the cluster the job runs on."""
    cmd = [python, "-m", "pipelines.cli", "run", job_there, "--address", "auto"]
    for stage in force:
        cmd += ["--force", stage]
    return shlex.join(cmd)


def runtime_env(working_dir: Path, env: dict[str, str], excludes: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime_env: this directory's code, the passed env vars, big and private files excluded."""
    env_vars = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    env_vars.update(env)
    return {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes], "env_vars": env_vars}


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings → dict; a malformed one is a one-line error naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SubmitError(f"--env: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def submit(client: JobSubmissionClient, spec: JobSpec, job_there: str, working_dir: Path, *, env: dict[str, str],
           excludes: Sequence[str] = (), force: Sequence[str] = (), python: str = "python") -> str:
    """Submit one graftline job; returns its submission id (`graftline-<job>-<time>-<hex>`)."""
    sid = f"graftline-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    try:
        return client.submit_job(entrypoint=entrypoint(job_there, force, python), submission_id=sid,
                                 runtime_env=runtime_env(working_dir, env, excludes),
                                 metadata={"graftline.job": spec.name, "graftline.job_file": job_there})
    except Exception as e:  # noqa: BLE001 - upload, auth and API errors all become one line
        raise SubmitError(f"submitting {job_there}: {_one_line(e)}") from None


def status(client: JobSubmissionClient, sid: str) -> tuple[str, str]:
    """(status, message) of a submitted job."""
    try:
        info = client.get_job_info(sid)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {sid}: {_one_line(e)}") from None
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""


def logs(client: JobSubmissionClient, sid: str) -> str:
    """The driver's whole log so far."""
    try:
        return client.get_job_logs(sid)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {sid}: {_one_line(e)}") from None


def follow(client: JobSubmissionClient, sid: str, write: Callable[[str], Any]) -> None:
    """Stream the driver's log to `write` until the job ends."""
    import asyncio

    async def tail() -> None:
        async for chunk in client.tail_job_logs(sid):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {sid}: following logs: {_one_line(e)}") from None


def wait(client: JobSubmissionClient, sid: str, poll_s: float = 2.0, timeout_s: float | None = None) -> tuple[str, str]:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns (status, message)."""
    t0 = time.monotonic()
    while True:
        st, msg = status(client, sid)
        if st in TERMINAL:
            return st, msg
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise SubmitError(f"job {sid}: still {st} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def stop(client: JobSubmissionClient, sid: str) -> bool:
    """Ask the cluster to stop a job; False when it had already ended."""
    try:
        return client.stop_job(sid)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {sid}: {_one_line(e)}") from None
