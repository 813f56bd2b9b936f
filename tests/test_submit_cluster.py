"""`graft submit/status/logs` against a real two-node Ray cluster on loopback, with token auth on.

The cluster is this test's own: two `ray start --block` processes (a head and a worker node, one CPU
each) in their own process groups, with a private temp dir, private ports and a fresh auth token in
their environment (never ~/.ray). Teardown stops exactly those processes (never `ray stop`, which
would stop every Ray on the machine) and fails if any of them is left.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import free_port, run_cli

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def graft(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


class LocalCluster:
    """A head and one worker node on 127.0.0.1, owned and stopped by this test."""

    def __init__(self, cpus_per_node: int = 1) -> None:
        # Short paths: Ray's socket paths must stay under 108 characters. One temp dir per node: two nodes on
        # one machine sharing one would each unpack the job's working_dir into the same folder, and the second
        # unpack deletes the first (the driver's cwd) on the way.
        self.temp_dir = tempfile.mkdtemp(prefix="gl-ray-", dir="/tmp")
        self.node_dirs = {"head": f"{self.temp_dir}/h", "worker": f"{self.temp_dir}/w"}
        self.gcs_port, self.dash_port = free_port(), free_port()
        self.token = secrets.token_hex(32)
        self.url = f"http://127.0.0.1:{self.dash_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
        # PATH without this venv: the head's `python` is not graftline's, as on a plain head; `graft submit` must name it
        path = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN)
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": path, "TOKENIZERS_PARALLELISM": "false"}
        self.procs: list[subprocess.Popen] = []
        self.cpus = cpus_per_node

    def _start(self, name: str, *args: str) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus}",
               f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={self.node_dirs[name]}", "--disable-usage-stats", *args]
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def start(self, timeout: float = 90) -> None:
        self._start("head", "--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dash_port}", f"--ray-client-server-port={free_port()}")
        self._wait(lambda: len(self.nodes()) >= 1, timeout, "head")
        self._start("worker", f"--address=127.0.0.1:{self.gcs_port}")
        self._wait(lambda: len(self.nodes()) >= 2, timeout, "worker node")

    def _wait(self, ready, timeout: float, what: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"ray start ({what}) exited:\n{self.logs()}")
            try:
                if ready():
                    return
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} not up after {timeout} s:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(Path(self.temp_dir).glob("*.log")))

    def nodes(self) -> list[str]:
        """Ids of the alive nodes, from the State API (which needs the token)."""
        req = urllib.request.Request(f"{self.url}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            rows = json.loads(r.read())["data"]["result"]["result"]
        return [n["node_id"] for n in rows if n["state"] == "ALIVE"]

    def jobs(self) -> list[dict]:
        """Every job submitted to the cluster, from the Jobs API (which needs the token)."""
        req = urllib.request.Request(f"{self.url}/api/jobs/", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    def own_processes(self) -> list[psutil.Process]:
        """Processes of this cluster: in its process groups, or naming its temp dir or GCS port."""
        groups = {p.pid for p in self.procs}
        marks = (self.temp_dir, f"127.0.0.1:{self.gcs_port}")
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmd = " ".join(proc.info["cmdline"] or ())
                if proc.pid != os.getpid() and (os.getpgid(proc.pid) in groups or any(m in cmd for m in marks)):
                    found.append(proc)
            except (psutil.Error, ProcessLookupError, PermissionError):
                continue
        return found

    def stop(self) -> None:
        """SIGTERM the `ray start --block` processes (they stop their children), then kill any leftover."""
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        left = self.own_processes()
        for proc in left:
            proc.kill()
        psutil.wait_procs(left, timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
        assert not c.own_processes(), "Ray processes of the test cluster are still running"


def tiny_job(tmp: Path, base: Path) -> dict:
    """One skill on a ready-made tiny base (no pretraining run: one Ray Train run in all, for time)."""
    return {
        "name": "ctest",
        "output_dir": str(tmp / "runs"),
        "base": str(base),
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "ctest"},
        "testbed": {"train_examples": 200, "eval_examples": 16},
        "skills": [{"name": "reverse"}],
        "train": {"steps": 6, "batch_size": 8, "warmup_steps": 2, "num_workers": 2},
        # 4 one-CPU tasks on 2 one-CPU nodes: the head runs one at a time, so the rest spill to the worker
        "score": {"examples": 8, "shards": 4},
        "evaluate": {"max_new_tokens": 8},
    }


@pytest.mark.integration
@pytest.mark.slow  # ~3 min on 2 cores (a whole pipeline over two Ray nodes): `make test-all`
def test_submit_runs_a_job_across_both_nodes(cluster, tmp_path, base_model):
    from mlflow.tracking import MlflowClient

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tmp_path, base_model)))
    proc = graft("submit", str(job), "--address", cluster.url, "--wait", env=cluster.env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    sid = proc.stdout.splitlines()[0].strip()
    assert sid.startswith("graftline-ctest-")
    assert f"{sid}: SUCCEEDED" in proc.stdout
    assert "graftline: job 'ctest'" in proc.stdout  # the driver's log was streamed
    # the head's PATH has no graftline Python: the job ran with this one, chosen because the head is this machine
    assert f"graft: plan: python: {sys.executable} (auto: local head" in proc.stderr
    assert f"graft: probe: {sys.executable} on the head imports torch" in proc.stderr

    st = graft("status", sid, "--address", cluster.url, env=cluster.env)
    assert st.returncode == 0 and st.stdout.startswith(f"{sid}: SUCCEEDED"), st.stderr
    logs = graft("logs", sid, "--address", cluster.url, env=cluster.env)
    assert logs.returncode == 0 and "graftline: job 'ctest'" in logs.stdout and "evaluate" in logs.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctest")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.info.run_name == "ctest"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["graftline.ray_submission_id"] == sid
    assert st.stdout.splitlines()[1].startswith(f"MLflow: run {parent.info.run_id} in experiment {exp.experiment_id}")
    assert float(parent.data.tags["graftline.ray_cpus"]) == 2  # the job saw both nodes
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert all(r.info.status == "FINISHED" for r in kids)
    stage = {r.data.tags["graftline.stage"]: r for r in kids}
    assert {"train", "score", "evaluate"} <= set(stage)
    assert stage["train"].data.params["deepspeed.world_size"] == "2"  # one worker per node
    assert set(stage["score"].data.tags["graftline.node_ids"].split(",")) == set(cluster.nodes())  # fan-out on both nodes


@pytest.mark.integration
def test_probe_on_a_real_head_refuses_a_python_without_torch(cluster, tmp_path):
    """The observed failure (the job's Python has no torch) now stops at the probe, before the job is submitted."""
    if subprocess.run([BASE_PYTHON, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{BASE_PYTHON} has torch")
    proc = graft("submit", str(ok_job(tmp_path)), "--address", cluster.url, "--python", BASE_PYTHON, env=cluster.env,
                 timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error: ")]
    assert len(errors) == 1 and f"{BASE_PYTHON} cannot import torch" in errors[0] and "--python PATH" in errors[0]
    assert "Traceback" not in proc.stderr
    ours = [j for j in cluster.jobs() if (j.get("metadata") or {}).get("graftline.job") == "sj"]
    assert ours and all(j["metadata"].get("graftline.probe") for j in ours)  # only the probe reached the head


@pytest.mark.integration
def test_status_without_the_token_is_refused_with_a_hint(cluster):
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    proc = graft("status", "no-such-job", "--address", cluster.url, env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("graft: error: ") and "RAY_AUTH_MODE=token" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.integration
def test_unknown_job_id_is_one_line(cluster):
    proc = graft("status", "no-such-job", "--address", cluster.url, env=cluster.env)
    assert proc.returncode == 1 and proc.stderr.startswith("graft: error: job no-such-job")
    assert len(proc.stderr.strip().splitlines()) == 1


# Fast checks of the submission plumbing (no cluster).

def test_bad_spec_is_rejected_before_contacting_the_cluster(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text(yaml.safe_dump({"name": "x", "skills": [{"name": "reverse"}], "train": {"steps": "many"}}))
    proc = graft("submit", str(job), "--address", "http://127.0.0.1:1", env=dict(os.environ))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{job}: train.steps: expected int, got 'many'"


def test_unreachable_cluster_is_one_line(tmp_path):
    job = tmp_path / "ok.yaml"
    job.write_text(yaml.safe_dump({"name": "x", "output_dir": str(tmp_path), "tracking": {"uri": "sqlite:////x.db"},
                                   "skills": [{"name": "reverse"}]}))
    proc = graft("submit", str(job), "--address", f"127.0.0.1:{free_port()}", env=dict(os.environ))
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error: ")]
    assert len(errors) == 1 and "cannot reach the Ray Jobs API at http://127.0.0.1:" in errors[0]


def test_address_resolution(monkeypatch):
    from pipelines.submit import SubmitError, resolve_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    assert resolve_address("https://ray.example:443") == "https://ray.example:443"
    with pytest.raises(SubmitError, match="--address"):
        resolve_address(None)
    with pytest.raises(SubmitError, match="dashboard URL"):
        resolve_address("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert resolve_address(None) == "http://127.0.0.1:8265"


def test_job_as_the_cluster_sees_it(monkeypatch, tmp_path):
    from pipelines.submit import DEFAULT_EXCLUDES, entrypoint, runtime_env, validate_for_cluster

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    spec, there, notes = validate_for_cluster(REPO / "jobs" / "demo.yaml", REPO)
    assert there == "jobs/demo.yaml" and spec.name == "demo"
    assert len(notes) == 1 and "output_dir 'runs' is relative" in notes[0]
    assert entrypoint(there, ["score"]) == "python -m pipelines.cli run jobs/demo.yaml --address auto --force score"
    env = runtime_env(REPO, {"HF_HUB_OFFLINE": "1"}, ["data/"])
    assert env["working_dir"] == str(REPO)
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "HF_HUB_OFFLINE": "1"}
    assert {".git", ".venv", "runs/", "*.safetensors", "data/"} <= set(env["excludes"])
    assert len(env["excludes"]) == len(DEFAULT_EXCLUDES) + 1
    outside = tmp_path / "job.yaml"
    outside.write_text((REPO / "jobs" / "demo.yaml").read_text())
    _, there, notes = validate_for_cluster(outside, REPO)
    assert there == str(outside.resolve()) and "outside the working directory" in notes[0]


# Which Python the head runs a job with, the probe that checks it, and the submission id in MLflow (no cluster:
# a fake Jobs API that runs each probe's entrypoint here, as a head's shell would).

BASE_PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")  # the interpreter under this venv: none of its packages


class FakeJobs:
    """A Jobs API client: runs probe entrypoints here in `cwd` (a shell command, as on a head), records other jobs."""

    def __init__(self, cwd: Path) -> None:
        self.cwd, self.jobs = cwd, {}

    def submit_job(self, *, entrypoint: str, submission_id: str, runtime_env: dict, metadata: dict) -> str:
        job = {"entrypoint": entrypoint, "runtime_env": runtime_env, "metadata": metadata, "log": "", "status": "PENDING"}
        if metadata.get("graftline.probe"):
            proc = subprocess.run(entrypoint, shell=True, cwd=self.cwd, capture_output=True, text=True, timeout=120,
                                  env={**os.environ, **runtime_env.get("env_vars", {})})
            job.update(log=proc.stdout + proc.stderr, status="SUCCEEDED" if proc.returncode == 0 else "FAILED")
        self.jobs[submission_id] = job
        return submission_id

    def get_job_info(self, sid: str):
        from types import SimpleNamespace

        if sid not in self.jobs:
            raise RuntimeError(f"Job {sid} does not exist")
        job = self.jobs[sid]
        return SimpleNamespace(status=job["status"], message="", metadata=job["metadata"])

    def get_job_logs(self, sid: str) -> str:
        return self.jobs[sid]["log"]

    def stop_job(self, sid: str) -> bool:
        return False

    def real_jobs(self) -> dict:
        return {k: v for k, v in self.jobs.items() if not v["metadata"].get("graftline.probe")}


def fake_python(folder: Path, missing: dict | None = None) -> Path:
    """An executable that answers the probe (argv: -c CODE CANDIDATE) as a Python lacking `missing` would:
    {module tried: [module not found, error]}; none missing, as one with graftline's whole stack."""
    report = json.dumps({"candidate": "CAND", "python": "PY", "missing": missing or {}, "ray": "2.60.0"})
    path = folder / f"py-{len(missing or {})}"
    path.write_text("#!/bin/sh\necho " + shlex.quote("GRAFTLINE_PROBE " + report).replace("CAND", "'\"$3\"'") + "\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_head(monkeypatch, tmp_path):
    """`graft submit/status` talking to a FakeJobs 'head' whose working directory is the repository."""
    from pipelines import submit

    jobs = FakeJobs(REPO)
    monkeypatch.setattr(submit, "connect", lambda address: (jobs, submit.resolve_address(address)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return jobs


def ok_job(tmp_path: Path, **over) -> Path:
    job = tmp_path / "job.yaml"
    spec = {"name": "sj", "output_dir": str(tmp_path / "runs"), "tracking": {"uri": f"sqlite:///{tmp_path / 'ml.db'}",
                                                                          "experiment": "sj"},
            "skills": [{"name": "reverse"}], **over}
    job.write_text(yaml.safe_dump(spec))
    return job


def test_runtime_env_names_the_python_for_the_driver_and_the_workers(tmp_path):
    from pipelines.submit import entrypoint, graftline_requirements, runtime_env

    env = runtime_env(REPO, {}, python="/opt/gl/bin/python")
    assert env["py_executable"] == "/opt/gl/bin/python" and "pip" not in env
    assert entrypoint("jobs/demo.yaml", (), "/opt/gl/bin/python", "graftline-demo-1") == (
        "/opt/gl/bin/python -m pipelines.cli run jobs/demo.yaml --address auto --submission-id graftline-demo-1")
    reqs = graftline_requirements(REPO)
    assert any(r.startswith("torch") for r in reqs) and any(r.startswith("deepspeed") for r in reqs)
    env = runtime_env(REPO, {}, python="python", pip=reqs)  # the virtualenv's python: no py_executable
    assert env["pip"]["packages"] == list(reqs) and "py_executable" not in env
    assert runtime_env(REPO, {})["working_dir"] == str(REPO) and "py_executable" not in runtime_env(REPO, {})


def test_the_python_is_chosen_explicitly_and_says_why(monkeypatch):
    from pipelines.submit import CLUSTER_PYTHONS, SubmitError, choose_runtime

    local, remote, unknown = (lambda url: True), (lambda url: False), (lambda url: None)
    assert choose_runtime("http://10.0.0.5:8265", python="/opt/py", head_local=local).python == "/opt/py"
    rt = choose_runtime("http://127.0.0.1:8265", head_local=local)
    assert rt.python == sys.executable and rt.described() == f"python: {sys.executable} (auto: local head, the Python running graft submit)"
    assert choose_runtime("http://localhost:8265", head_local=unknown).python == sys.executable  # the URL decides
    # a tunnel: 127.0.0.1, but the head's node IP is not this machine's → the probe picks among the clusters' Pythons
    rt = choose_runtime("http://127.0.0.1:8265", head_local=remote)
    assert rt.python is None and rt.candidates == ("python3", "/home/ray/anaconda3/bin/python")
    assert choose_runtime("http://10.0.0.5:8265", head_local=unknown).candidates == rt.candidates
    assert choose_runtime("http://10.0.0.5:8265", cluster="aws", head_local=local).python == "python3"
    assert choose_runtime("http://x:8265", cluster="cluster/kuberay/rayjob.yaml").python == CLUSTER_PYTHONS["kuberay"].python
    assert choose_runtime("http://x:8265", cluster="./cluster/docker/Dockerfile").python == "/home/ray/anaconda3/bin/python"
    with pytest.raises(SubmitError, match="--cluster: unknown cluster 'azure'; known: aws, gcp, kuberay"):
        choose_runtime("http://x:8265", cluster="azure")
    rt = choose_runtime("http://x:8265", pip=True, working_dir=REPO)
    assert rt.python == "python" and rt.pip and rt.why.startswith("--pip")


def test_cluster_pythons_match_the_cluster_definitions():
    """Each CLUSTER_PYTHONS entry names the interpreter its files install graftline into."""
    from pipelines.submit import CLUSTER_PYTHONS

    for name in ("aws", "gcp"):
        entry = CLUSTER_PYTHONS[name]
        (path,) = entry.files
        cfg = yaml.safe_load((REPO / path).read_text())
        assert f"{entry.python} -m pip install -q -e ~/graftline" in cfg["head_setup_commands"], path
        assert any(c.startswith(f"{entry.python} -m pip install") and "ray[default" in c for c in cfg["setup_commands"])
    kube = CLUSTER_PYTHONS["kuberay"]
    docker = (REPO / "cluster/docker/Dockerfile").read_text()
    base = next(line.split()[1] for line in docker.splitlines() if line.startswith("FROM "))
    # rayproject/ray images run Ray from the conda Python under /home/ray/anaconda3, which the image's `pip` installs into
    assert base.startswith("rayproject/ray:") and kube.python == "/home/ray/anaconda3/bin/python"
    assert "RUN pip install" in docker and '"ray[default,train,tune]==2.60.0" .' in docker
    tag = next(line.split()[-1] for line in docker.splitlines() if "docker build" in line)
    for path in kube.files[:2]:
        assert tag in (REPO / path).read_text(), f"{path} does not run graftline's image {tag}"


def test_probe_refuses_a_python_without_torch_in_one_line(tmp_path):
    from pipelines.submit import Runtime, SubmitError, probe

    if subprocess.run([BASE_PYTHON, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{BASE_PYTHON} has torch")
    jobs = FakeJobs(REPO)
    t0 = time.monotonic()
    with pytest.raises(SubmitError) as e:
        probe(jobs, "http://h:8265", Runtime(BASE_PYTHON, "--python"), REPO, {})
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    assert msg.startswith(f"probe: on the head at http://h:8265, {BASE_PYTHON} cannot import torch (ModuleNotFoundError")
    assert "--python PATH" in msg and "--pip" in msg and "--cluster NAME" in msg and "\n" not in msg
    (only,) = jobs.jobs.values()
    assert "py_executable" not in only["runtime_env"] and only["runtime_env"]["working_dir"] == str(REPO)

    with pytest.raises(SubmitError, match="/nowhere/python does not exist there.*that head is not this machine"):
        probe(jobs, "http://127.0.0.1:8265", Runtime("/nowhere/python", "auto: local head, ..."), REPO, {})


def test_probe_picks_the_first_cluster_python_that_runs_graftline(tmp_path):
    from pipelines.submit import Runtime, SubmitError, probe

    ok = str(fake_python(tmp_path))
    rt = Runtime(None, "auto: ...", candidates=("/nowhere/python", ok))
    python, seconds = probe(FakeJobs(REPO), "http://h:8265", rt, REPO, {})
    assert python == ok and seconds < 30
    rt = Runtime(None, "auto: ...", candidates=("/nowhere/python", BASE_PYTHON))
    with pytest.raises(SubmitError, match=r"tried 2 Pythons.*/nowhere/python does not exist there; .* cannot import torch"):
        probe(FakeJobs(REPO), "http://h:8265", rt, REPO, {})


def test_probe_says_when_the_working_dir_is_not_graftline(tmp_path):
    from pipelines.submit import Runtime, SubmitError, probe

    py = str(fake_python(tmp_path, {"graft": ["graft", "ModuleNotFoundError: No module named 'graft'"],
                                    "pipelines.driver": ["pipelines", "ModuleNotFoundError: No module named 'pipelines'"]}))
    with pytest.raises(SubmitError, match=r"cannot import graftline's code \(ModuleNotFoundError: No module named 'graft'\): "
                                          r"--working-dir /elsewhere must be a graftline checkout"):
        probe(FakeJobs(tmp_path), "http://h:8265", Runtime(py, "--python"), Path("/elsewhere"), {})


def test_submit_fails_before_the_job_when_the_probe_fails(fake_head, tmp_path):
    if subprocess.run([BASE_PYTHON, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{BASE_PYTHON} has torch")
    proc = run_cli("submit", ok_job(tmp_path), "--address", "http://10.0.0.5:8265", "--python", BASE_PYTHON)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("graft: error: ")]
    assert len(errors) == 1 and "cannot import torch" in errors[0], proc.stderr
    assert f"graft: plan: python: {BASE_PYTHON} (--python)" in proc.stderr
    assert not fake_head.real_jobs() and proc.stdout == ""


def test_submit_passes_the_python_and_the_submission_id(fake_head, tmp_path):
    ok = str(fake_python(tmp_path))
    proc = run_cli("submit", ok_job(tmp_path), "--address", "http://10.0.0.5:8265", "--python", ok)
    assert proc.returncode == 0, proc.stderr
    sid = proc.stdout.strip()
    job = fake_head.real_jobs()[sid]
    assert job["entrypoint"].startswith(f"{ok} -m pipelines.cli run ") and job["entrypoint"].endswith(f"--submission-id {sid}")
    assert job["runtime_env"]["py_executable"] == ok
    assert job["metadata"]["graftline.tracking_uri"] == f"sqlite:///{tmp_path / 'ml.db'}"
    assert job["metadata"]["graftline.experiment"] == "sj"
    assert f"graft: probe: {ok} on the head imports torch, ray, deepspeed, graft" in proc.stderr


def test_submit_auto_python_and_no_probe(fake_head, monkeypatch, tmp_path):
    from pipelines import submit

    monkeypatch.setattr(submit, "head_is_this_machine", lambda url: True)
    proc = run_cli("submit", ok_job(tmp_path), "--address", "http://127.0.0.1:8265", "--no-probe")
    assert proc.returncode == 0, proc.stderr
    assert f"graft: plan: python: {sys.executable} (auto: local head" in proc.stderr
    (job,) = fake_head.jobs.values()  # no probe
    assert job["runtime_env"]["py_executable"] == sys.executable

    monkeypatch.setattr(submit, "head_is_this_machine", lambda url: False)  # a tunnel to a remote head
    proc = run_cli("submit", ok_job(tmp_path), "--address", "http://127.0.0.1:8265", "--no-probe")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "graft: error: --no-probe: the head is not this machine, so its Python is unknown: pass --python PATH or "
        "--cluster NAME (aws, gcp, kuberay)")
    assert len(fake_head.jobs) == 1


def test_head_on_this_machine_by_its_node_ip(monkeypatch):
    from types import SimpleNamespace

    import ray.util.state

    from pipelines import submit

    for ip, expect in (("127.0.0.1", True), ("10.123.45.67", False)):
        monkeypatch.setattr(ray.util.state, "list_nodes", lambda ip=ip, **kw: [SimpleNamespace(node_ip=ip)])
        assert submit.head_is_this_machine("http://127.0.0.1:8265") is expect

    def refuse(**kw):
        raise ConnectionError("no State API")

    monkeypatch.setattr(ray.util.state, "list_nodes", refuse)
    assert submit.head_is_this_machine("http://127.0.0.1:8265") is None


def test_driver_tags_the_run_and_status_prints_its_link(fake_head, monkeypatch, tmp_path):
    """`graft run --submission-id` tags the parent run; `graft status ID` finds it through the job's metadata."""
    from contextlib import contextmanager
    from types import SimpleNamespace

    from pipelines import driver
    from pipelines.spec import load_job
    from pipelines.submit import run_link
    from pipelines.tracking import SUBMISSION_TAG, Tracker

    job = ok_job(tmp_path)
    spec = load_job(job)
    uri = f"sqlite:///{tmp_path / 'ml.db'}"
    recipe = SimpleNamespace(name="none", stages=(), description="no stages", modules=lambda: [], sections=lambda: set())

    @contextmanager
    def session(spec, address, uri, folder, log):
        yield {"CPU": 1}, Tracker(uri, spec.tracking.experiment, artifact_root=tmp_path / "art", job=spec.name)

    monkeypatch.setattr(driver, "check_job", lambda spec, path: recipe)
    monkeypatch.setattr(driver, "require_fit", lambda *a: None)
    monkeypatch.setattr(driver, "job_session", session)
    sid = "graftline-sj-20260101-000000-abcd"
    driver.run_job(spec, job, submission_id=sid, log=lambda line: None)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sj")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags[SUBMISSION_TAG] == sid
    link = run_link(sid, uri, "sj")
    assert link.startswith(f"run {run.info.run_id} in experiment {exp.experiment_id} ('sj') at {uri}")
    assert f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}" in link

    fake_head.jobs[sid] = {"status": "SUCCEEDED", "log": "", "metadata": {
        "graftline.job": "sj", "graftline.tracking_uri": uri, "graftline.experiment": "sj"}}
    proc = run_cli("status", sid, "--address", "http://10.0.0.5:8265")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"{sid}: SUCCEEDED", f"MLflow: {link}"]
    proc = run_cli("status", "graftline-sj-other", "--address", "http://10.0.0.5:8265")
    assert proc.returncode == 1 and proc.stderr.startswith("graft: error: job graftline-sj-other")
    fake_head.jobs["raysubmit_x"] = {"status": "RUNNING", "log": "", "metadata": {}}  # not a graftline job: status only
    proc = run_cli("status", "raysubmit_x", "--address", "http://10.0.0.5:8265")
    assert proc.returncode == 0 and proc.stdout == "raysubmit_x: RUNNING\n" and proc.stderr == ""
    fake_head.jobs["graftline-sj-2"] = {"status": "RUNNING", "log": "", "metadata": {"graftline.job": "sj",
                                                                                     "graftline.experiment": "sj"}}
    proc = run_cli("status", "graftline-sj-2", "--address", "http://10.0.0.5:8265")  # its tracking URI is the cluster's
    assert proc.returncode == 0 and "pass --tracking-uri URI" in proc.stderr
    proc = run_cli("status", "graftline-sj-2", "--address", "http://10.0.0.5:8265", "--tracking-uri", uri)
    assert proc.returncode == 0 and "no run tagged graftline.ray_submission_id=graftline-sj-2" in proc.stderr


def test_run_link_for_a_tracking_server(monkeypatch):
    from types import SimpleNamespace

    import mlflow.tracking

    from pipelines.submit import SubmitError, run_link

    class Client:
        def __init__(self, uri):
            pass

        def get_experiment_by_name(self, name):
            return SimpleNamespace(experiment_id="7")

        def search_runs(self, ids, filter_string, max_results):
            assert filter_string == "tags.`graftline.ray_submission_id` = 'graftline-x-1'"
            return [SimpleNamespace(info=SimpleNamespace(experiment_id="7", run_id="abc", status="RUNNING"),
                                    data=SimpleNamespace(tags={}))]

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Client)
    assert run_link("graftline-x-1", "http://mlflow:5000/", "x") == "http://mlflow:5000/#/experiments/7/runs/abc   (RUNNING)"
    with pytest.raises(SubmitError, match="needs its password"):
        run_link("graftline-x-1", "postgresql://u:***@db/mlflow", "x")
    with pytest.raises(SubmitError, match="is not on this machine"):
        run_link("graftline-x-1", "sqlite:////nowhere/mlflow.db", "x")
