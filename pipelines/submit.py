"""Submitting graftline jobs to a running Ray cluster through its Jobs API, and following them.

`graft submit JOB.yaml --address http://HEAD:8265` validates the job spec here, picks the Python the head runs the
job with (`choose_runtime`), checks with a probe job of a few seconds that this Python can import graftline's stack
on the head (`probe`), then ships the working directory (the code the cluster runs) as the job's runtime_env
`working_dir` and starts `PYTHON -m pipelines.cli run JOB.yaml --address auto --submission-id ID` as the job's
driver on the head node. `graft status|logs|stop ID` talk to the same API; `graft status` also finds the job's
MLflow run by the tag the driver sets from `--submission-id` (`run_link`).

Why the Python is named explicitly: Ray runs a job's entrypoint with the head's first `python` on PATH, whatever
Ray itself runs with, and starts the job's workers with the Python Ray was started with. Neither need have torch.
The entrypoint names the chosen interpreter and the runtime_env's `py_executable` gives the same one to the
supervisor and every worker (or `pip` builds a virtualenv that both use).

Token auth: a cluster started with `RAY_AUTH_MODE=token` answers 401 unless this process also has
`RAY_AUTH_MODE=token` and the cluster's token (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or
`~/.ray/auth_token`). The token is never put into the job's runtime_env: the cluster has its own.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

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
# Job metadata `graft submit` records, read back by `graft status`.
META_JOB, META_JOB_FILE = "graftline.job", "graftline.job_file"
META_TRACKING_URI, META_EXPERIMENT = "graftline.tracking_uri", "graftline.experiment"


class SubmitError(RuntimeError):
    """A submission or query that failed; its message is the one line the CLI prints."""


@dataclass(frozen=True)
class ClusterPython:
    """The Python that runs graftline on the nodes of one kind of cluster defined in `cluster/`."""

    name: str
    files: tuple[str, ...]  # the definitions (relative to the repository root) this describes
    python: str  # the interpreter with graftline installed, as the head's shell resolves it
    source: str  # where in those files graftline is installed into it


# The one place that says which Python has graftline installed on each cluster defined in `cluster/`.
# `tests/test_submit_cluster.py` checks every entry against the files it names.
CLUSTER_PYTHONS: dict[str, ClusterPython] = {
    "aws": ClusterPython("aws", ("cluster/aws.yaml",), "python3",
                         "head_setup_commands: python3 -m pip install -e ~/graftline"),
    "gcp": ClusterPython("gcp", ("cluster/gcp.yaml",), "python3",
                         "head_setup_commands: python3 -m pip install -e ~/graftline"),
    "kuberay": ClusterPython("kuberay", ("cluster/kuberay/raycluster.yaml", "cluster/kuberay/rayjob.yaml",
                                         "cluster/docker/Dockerfile"),
                             "/home/ray/anaconda3/bin/python",
                             "graftline's image (cluster/docker/Dockerfile) pip-installs graftline into the conda Python "
                             "of its rayproject/ray base"),
}
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
# What the probe imports: the stack the driver and its workers need, and graftline's own code as the job will see it.
PROBE_MODULES = ("torch", "ray", "deepspeed", "graft", "pipelines.driver")
PROBE_MARK = "GRAFTLINE_PROBE"
PROBE_TIMEOUT_S = 120.0  # an explicit Python: imports take seconds; this bounds a head that never starts the probe
PROBE_PIP_TIMEOUT_S = 1800.0  # --pip: the probe builds the job's virtualenv (torch, DeepSpeed, ...), reused by the job


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


# --- which Python the head runs the job with ------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """How the head runs a job: the Python (or the candidates the probe picks from), and why that one.

    `python` is None only while the probe still has to pick among `candidates`. With `pip` the job runs in a
    virtualenv Ray builds with those requirements, and `python` is that virtualenv's (the entrypoint's `python`).
    """

    python: str | None
    why: str
    candidates: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()

    def described(self) -> str:
        """`python: X (why)`, the line of the printed plan."""
        if self.python is None:
            return f"python: one of {', '.join(self.candidates)} ({self.why})"
        return f"python: {self.python} ({self.why})"


def cluster_python(name: str) -> ClusterPython:
    """The entry of CLUSTER_PYTHONS for `--cluster NAME`, where NAME is a key or one of the files an entry names."""
    if name in CLUSTER_PYTHONS:
        return CLUSTER_PYTHONS[name]
    wanted = Path(name).as_posix().removeprefix("./")
    for entry in CLUSTER_PYTHONS.values():
        if any(wanted == f or wanted.endswith("/" + f) for f in entry.files):
            return entry
    raise SubmitError(f"--cluster: unknown cluster {name!r}; known: {', '.join(CLUSTER_PYTHONS)} "
                      f"(or one of their files: {', '.join(f for c in CLUSTER_PYTHONS.values() for f in c.files)})")


def graftline_requirements(working_dir: Path) -> tuple[str, ...]:
    """graftline's own requirements, for `--pip`: from the shipped checkout's pyproject.toml, else the installed package."""
    import tomllib

    pyproject = working_dir / "pyproject.toml"
    if pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == "graftline":
            return tuple(project.get("dependencies", ()))
    from importlib import metadata

    try:
        reqs = metadata.requires("graftline") or []
    except metadata.PackageNotFoundError:
        raise SubmitError(f"--pip: {pyproject} is not graftline's and graftline is not installed here: "
                          "ship a graftline checkout as --working-dir") from None
    return tuple(r for r in reqs if "extra ==" not in r)


def _local_addresses() -> set[str]:
    import psutil

    return {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs} | set(LOOPBACK_HOSTS)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def head_is_this_machine(url: str) -> bool | None:
    """Whether the cluster's head node runs on this machine; None when the State API cannot say.

    A loopback URL alone does not tell: `ray dashboard` and `kubectl port-forward` put a remote head behind
    http://127.0.0.1:8265. The head node's own IP does: a local head's is one of this machine's addresses.
    """
    try:
        from ray.util.state import list_nodes

        heads = list_nodes(address=url, filters=[("is_head_node", "=", True)], timeout=10, raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - an older head, a proxy without the State API: fall back to the URL
        return None
    if not heads:
        return None
    ip = heads[0].node_ip
    return _is_loopback(ip) or ip in _local_addresses()


def choose_runtime(url: str, *, python: str | None = None, cluster: str | None = None, pip: bool = False,
                   working_dir: Path | None = None,
                   head_local: Callable[[str], bool | None] | None = None) -> Runtime:
    """The Python the head runs the job with, and why: given, a known cluster's, this machine's, or the probe's pick.

    1. `--python PATH`: that one.
    2. `--pip`: a virtualenv Ray builds on the head from graftline's requirements.
    3. `--cluster NAME`: the Python CLUSTER_PYTHONS names for that cluster definition.
    4. a head on this machine (its node IP is one of ours; the URL's host when the head cannot say): the Python
       running `graft submit`, which that head reaches on the same filesystem.
    5. any other head: the probe tries every CLUSTER_PYTHONS interpreter in turn and the job uses the first that
       imports graftline's stack.
    """
    if python:
        return Runtime(python, "--python")
    if pip:
        reqs = graftline_requirements(working_dir or Path.cwd())
        return Runtime("python", f"--pip: a virtualenv on the head with graftline's {len(reqs)} requirements", pip=reqs)
    if cluster:
        entry = cluster_python(cluster)
        return Runtime(entry.python, f"--cluster {entry.name}: {entry.source}")
    host = urlsplit(url).hostname or ""
    local = (head_local or head_is_this_machine)(url)
    if local is None:
        local = _is_loopback(host) or host in _local_addresses()
    if local:
        return Runtime(sys.executable, "auto: local head, the Python running graft submit")
    candidates = tuple(dict.fromkeys(c.python for c in CLUSTER_PYTHONS.values()))
    return Runtime(None, "auto: the head is not this machine; the probe picks the first that runs graftline, from "
                         "the cluster definitions in cluster/", candidates=candidates)


# --- the job: entrypoint and runtime_env ----------------------------------------------------------------------------


def new_submission_id(job_name: str) -> str:
    """A submission id that names the job and when: `graftline-<job>-<YYYYmmdd-HHMMSS>-<hex>`."""
    return f"graftline-{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def entrypoint(job_there: str, force: Sequence[str] = (), python: str = "python", submission_id: str | None = None) -> str:
    """The driver command the cluster runs; `--address auto` joins the cluster the job runs on, `--submission-id`
    becomes the MLflow tag that links the job's run to this submission."""
    cmd = [python, "-m", "pipelines.cli", "run", job_there, "--address", "auto"]
    for stage in force:
        cmd += ["--force", stage]
    if submission_id:
        cmd += ["--submission-id", submission_id]
    return shlex.join(cmd)


def runtime_env(working_dir: Path, env: dict[str, str], excludes: Sequence[str] = (), *, python: str | None = None,
                pip: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime_env: this directory's code, the passed env vars, big and private files excluded, and the
    Python (`py_executable`: the supervisor and every worker run with it) or the `pip` requirements of a virtualenv."""
    env_vars = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    env_vars.update(env)
    out: dict[str, Any] = {"working_dir": str(working_dir), "excludes": [*DEFAULT_EXCLUDES, *excludes], "env_vars": env_vars}
    if pip:
        out["pip"] = {"packages": list(pip), "pip_check": False}
    elif python:
        out["py_executable"] = python
    return out


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings → dict; a malformed one is a one-line error naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SubmitError(f"--env: expected KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _redacted(uri: str) -> str:
    """`uri` without a password (job metadata is shown on the dashboard to anyone who can reach it)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def tracking_of(spec: JobSpec, env_vars: dict[str, str]) -> str | None:
    """The tracking URI the job will log to, as its driver resolves it, when it means the same on the head as here."""
    from pipelines.tracking import default_tracking_uri

    uri = spec.tracking.uri or env_vars.get("MLFLOW_TRACKING_URI")
    if uri:
        return _redacted(uri)
    return default_tracking_uri(spec.output_dir) if spec.output_dir.is_absolute() else None


def submit(client: JobSubmissionClient, spec: JobSpec, job_there: str, working_dir: Path, *, env: dict[str, str],
           excludes: Sequence[str] = (), force: Sequence[str] = (), runtime: Runtime | None = None,
           submission_id: str | None = None) -> str:
    """Submit one graftline job with the Python of `runtime` (default: `python` on the head's PATH); returns its
    submission id, which the job's MLflow parent run carries as its `graftline.ray_submission_id` tag."""
    runtime = runtime or Runtime("python", "default")
    if runtime.python is None:
        raise SubmitError(f"submitting {job_there}: no Python chosen ({runtime.why}): pass --python PATH or --cluster NAME")
    sid = submission_id or new_submission_id(spec.name)
    renv = runtime_env(working_dir, env, excludes, python=runtime.python, pip=runtime.pip)
    meta = {META_JOB: spec.name, META_JOB_FILE: job_there, META_EXPERIMENT: spec.tracking.experiment}
    uri = tracking_of(spec, renv["env_vars"])
    if uri:
        meta[META_TRACKING_URI] = uri
    try:
        return client.submit_job(entrypoint=entrypoint(job_there, force, runtime.python, sid), submission_id=sid,
                                 runtime_env=renv, metadata=meta)
    except Exception as e:  # noqa: BLE001 - upload, auth and API errors all become one line
        raise SubmitError(f"submitting {job_there}: {_one_line(e)}") from None


# --- the probe ------------------------------------------------------------------------------------------------------

_PROBE_CODE = f"""
import importlib, json, sys
bad = {{}}
for m in {PROBE_MODULES!r}:
    try:
        importlib.import_module(m)
    except BaseException as e:
        name = getattr(e, "name", None) if isinstance(e, ImportError) else None
        bad[m] = [name or m, (type(e).__name__ + ": " + str(e)).splitlines()[0][:300]]
ray = sys.modules.get("ray")
report = {{"candidate": sys.argv[1], "python": sys.executable, "missing": bad, "ray": getattr(ray, "__version__", None)}}
print({PROBE_MARK!r}, json.dumps(report))
sys.exit(3 if bad else 0)
""".strip()


def probe_entrypoint(candidates: Sequence[str]) -> str:
    """A shell command trying each candidate Python in turn until one imports PROBE_MODULES; one marked line each."""
    quoted = " ".join(shlex.quote(c) for c in candidates)
    return (f'for py in {quoted}; do if command -v "$py" >/dev/null 2>&1; then "$py" -c {shlex.quote(_PROBE_CODE)} "$py" '
            f'&& break; else echo "{PROBE_MARK}_ABSENT $py"; fi; done; exit 0')


@dataclass
class ProbeResult:
    """What the probe found: per candidate, absent or the modules it cannot import (none: it runs graftline)."""

    found: dict[str, dict[str, Any]] = field(default_factory=dict)  # candidate → {"python", "missing", "ray"}
    absent: list[str] = field(default_factory=list)

    def working(self) -> str | None:
        """The first candidate that imports everything."""
        return next((c for c, r in self.found.items() if not r["missing"]), None)


def parse_probe_log(log: str) -> ProbeResult:
    """The probe's marked lines → ProbeResult, candidates in the order they were tried."""
    result = ProbeResult()
    for line in log.splitlines():
        if line.startswith(f"{PROBE_MARK}_ABSENT "):
            result.absent.append(line.split(" ", 1)[1].strip())
        elif line.startswith(f"{PROBE_MARK} "):
            try:
                report = json.loads(line.split(" ", 1)[1])
            except ValueError:
                continue
            result.found[report["candidate"]] = report
    return result


def probe_failure(result: ProbeResult, runtime: Runtime, url: str, working_dir: Path) -> str:
    """The one line that says why no candidate can run the job on the head, and which fix applies."""
    fix = ("pass --python PATH of a Python with graftline installed on the head (cluster/README.md), --cluster NAME "
           f"for one of graftline's cluster definitions ({', '.join(CLUSTER_PYTHONS)}), or --pip to install graftline's "
           "requirements into the job's virtualenv")
    own_code = {"graft", "pipelines", "pipelines.driver"}
    for cand, report in result.found.items():
        missing = report["missing"]
        if missing and all(m in own_code and name in own_code for m, (name, _) in missing.items()):
            first = next(iter(missing.values()))
            return (f"probe: {cand} on the head cannot import graftline's code ({first[1]}): --working-dir {working_dir} "
                    "must be a graftline checkout (it holds graft/ and pipelines/)")
    reasons = [f"{c} does not exist there" for c in result.absent]
    for cand, report in result.found.items():
        name, err = next(((n, e) for n, e in report["missing"].values() if n not in own_code),
                         next(iter(report["missing"].values())))
        reasons.append(f"{cand} cannot import {name} ({err})")
    if not reasons:
        return f"probe: no report from the probe job on {url}: see its log with `graft logs`; or skip the check with --no-probe"
    where = "the head" if len(reasons) == 1 else f"the head (tried {len(reasons)} Pythons)"
    if runtime.pip:
        return f"probe: the --pip virtualenv on {where}: {'; '.join(reasons)}: check graftline's requirements install there"
    if result.absent and runtime.why.startswith("auto: local head"):
        return (f"probe: {'; '.join(reasons)} on the head at {url}: that head is not this machine (a tunnel?): {fix}")
    return f"probe: on {where} at {url}, {'; '.join(reasons)}: {fix}"


def probe(client: JobSubmissionClient, url: str, runtime: Runtime, working_dir: Path, env: dict[str, str],
          excludes: Sequence[str] = (), *, job_name: str = "job", timeout_s: float | None = None,
          poll_s: float = 0.5) -> tuple[str, float]:
    """Run a probe job on the head with the job's runtime_env; return the Python that runs graftline and the seconds.

    The probe's runtime_env is the job's without `py_executable`: a missing interpreter there leaves a job PENDING
    for good (the head keeps failing to start its supervisor), while the probe's entrypoint names each candidate
    itself and reports one that is absent. Its working_dir upload is content-addressed, so the job reuses it.
    Raises SubmitError with the one line `probe_failure` writes.
    """
    candidates = (runtime.python,) if runtime.python else runtime.candidates
    timeout_s = timeout_s if timeout_s is not None else (PROBE_PIP_TIMEOUT_S if runtime.pip else PROBE_TIMEOUT_S)
    renv = runtime_env(working_dir, env, excludes, pip=runtime.pip)
    sid = f"graftline-probe-{job_name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    t0 = time.monotonic()
    try:
        client.submit_job(entrypoint=probe_entrypoint(candidates), submission_id=sid, runtime_env=renv,
                          metadata={"graftline.probe": "1", META_JOB: job_name})
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"probe: submitting to the head: {_one_line(e)}") from None
    try:
        state, message = wait(client, sid, poll_s=poll_s, timeout_s=timeout_s)
    except SubmitError:
        try:
            client.stop_job(sid)
        except Exception:  # noqa: BLE001, S110 - best effort: the error below says what to look at
            pass
        st, msg = status(client, sid)
        raise SubmitError(f"probe: job {sid} still {st} after {timeout_s:.0f} s ({msg.strip() or 'no message'}): "
                          f"see `graft logs {sid}`, or skip the check with --no-probe") from None
    result = parse_probe_log(logs(client, sid))
    seconds = time.monotonic() - t0
    good = result.working()
    if good:
        return good, seconds
    if state != "SUCCEEDED" and not result.found and not result.absent:
        last = message.strip().splitlines()[-1] if message.strip() else "no message"
        raise SubmitError(f"probe: job {sid} {state} before it ran ({last}): see `graft logs {sid}`")
    raise SubmitError(probe_failure(result, runtime, url, working_dir))


# --- following a job ------------------------------------------------------------------------------------------------


def job_info(client: JobSubmissionClient, sid: str) -> tuple[str, str, dict[str, str]]:
    """(status, message, metadata) of a submitted job."""
    try:
        info = client.get_job_info(sid)
    except Exception as e:  # noqa: BLE001
        raise SubmitError(f"job {sid}: {_one_line(e)}") from None
    state = str(info.status.value if hasattr(info.status, "value") else info.status)
    return state, info.message or "", dict(info.metadata or {})


def status(client: JobSubmissionClient, sid: str) -> tuple[str, str]:
    """(status, message) of a submitted job."""
    state, message, _ = job_info(client, sid)
    return state, message


def run_link(sid: str, tracking_uri: str, experiment: str) -> str:
    """Where the MLflow run of submission `sid` is: the UI link of the parent run its driver tagged with `sid`.

    Raises SubmitError (one line) when the store cannot be read or holds no such run yet.
    """
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import SUBMISSION_TAG, ui_link

    if "'" in sid:
        raise SubmitError(f"MLflow: {sid!r} is not a submission id")
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():  # opening a missing sqlite store would create one
            raise SubmitError(f"MLflow: {path} is not on this machine (the job's store is on the head): "
                              "pass --tracking-uri of a store you can read")
    if "***@" in tracking_uri:
        raise SubmitError(f"MLflow: {tracking_uri} needs its password: pass --tracking-uri")
    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(experiment)
        runs = [] if exp is None else client.search_runs(
            [exp.experiment_id], filter_string=f"tags.`{SUBMISSION_TAG}` = '{sid}'", max_results=10)
    except Exception as e:  # noqa: BLE001 - connection, auth and store errors become one line
        raise SubmitError(f"MLflow at {tracking_uri}: {_one_line(e)}") from None
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise SubmitError(f"MLflow: no run tagged {SUBMISSION_TAG}={sid} in experiment {experiment!r} at {tracking_uri} "
                          "(yet: the driver creates it once Ray is up)")
    run = parents[0]
    eid, rid = run.info.experiment_id, run.info.run_id
    if re.match(r"^https?://", tracking_uri):
        return f"{ui_link(tracking_uri, eid, rid)}   ({run.info.status})"
    return (f"run {rid} in experiment {eid} ({experiment!r}) at {tracking_uri}   ({run.info.status}); in the UI: "
            f"`graft ui --uri {tracking_uri}`, then {ui_link('http://127.0.0.1:5000', eid, rid)}")


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
