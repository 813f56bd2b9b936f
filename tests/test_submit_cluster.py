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
import shutil
import signal
import socket
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

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "TOKENIZERS_PARALLELISM": "false"}
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

    st = graft("status", sid, "--address", cluster.url, env=cluster.env)
    assert st.returncode == 0 and st.stdout.startswith(f"{sid}: SUCCEEDED"), st.stderr
    logs = graft("logs", sid, "--address", cluster.url, env=cluster.env)
    assert logs.returncode == 0 and "graftline: job 'ctest'" in logs.stdout and "evaluate" in logs.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ctest")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.info.run_name == "ctest"]
    assert parent.info.status == "FINISHED"
    assert float(parent.data.tags["graftline.ray_cpus"]) == 2  # the job saw both nodes
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert all(r.info.status == "FINISHED" for r in kids)
    stage = {r.data.tags["graftline.stage"]: r for r in kids}
    assert {"train", "score", "evaluate"} <= set(stage)
    assert stage["train"].data.params["deepspeed.world_size"] == "2"  # one worker per node
    assert set(stage["score"].data.tags["graftline.node_ids"].split(",")) == set(cluster.nodes())  # fan-out on both nodes


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
