"""Every case of the fault matrix (tests/fault_matrix.py) through the `graft` command line, in this process.

Each case asserts the exit code, the one-line message naming the file and the field, and that
nothing else on disk changed (the world of inputs and the case's own folder are snapshotted around
the run). `benchmarks/faults.py` runs the same cases as subprocesses, plus the slow ones that need
real training, and writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.fault_matrix import CASES, build_world, run_case, run_in_process

FAST = [c for c in CASES if not c.slow]


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def test_the_matrix_is_big_enough_and_names_are_unique():
    assert len(CASES) >= 60
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", FAST, ids=[re.sub(r"\W+", "-", c.name).strip("-") for c in FAST])
def test_fault(case, world, tmp_path):
    outcome = run_case(case, world, tmp_path / "case", run_in_process)
    expected = "clean_refusal" if case.expect.code else "ok"
    assert outcome.verdict == expected, f"{outcome.verdict}: {outcome.detail}\nmessage: {outcome.message}"


def test_a_killed_drivers_runs_are_marked_killed_by_the_next_start(tmp_path):
    """A run left RUNNING by a process that is gone becomes KILLED; one whose process lives is left alone."""
    from pipelines.tracking import OWNER_TAG, Tracker, process_identity

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    script = ("import sys, time\nfrom pipelines.tracking import Tracker\n"
              f"t = Tracker({uri!r}, 'e', job='j')\n"
              "with t.run('j') as parent:\n    with t.run('train/x', parent=parent):\n"
              "        print(parent.run_id, flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        parent_id = proc.stdout.readline().strip()
        tracker = Tracker(uri, "e", job="j")
        live = tracker.client.create_run(tracker.experiment_id, tags={"graftline.job": "j", OWNER_TAG: process_identity()})
        assert tracker.close_stale_runs() == []  # its driver still runs
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.1)
    killed = tracker.close_stale_runs()
    runs = {r.info.run_id: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert len(killed) == 2 and parent_id in killed
    assert all(runs[r].info.status == "KILLED" and "is gone" in runs[r].data.tags["graftline.error"] for r in killed)
    assert runs[live.info.run_id].info.status == "RUNNING"
