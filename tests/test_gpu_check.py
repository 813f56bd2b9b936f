"""The GPU check is ready to run: its shell wrapper parses, it exits 0 at once without a GPU, and its dry run builds
every input that needs no GPU (the ~1B config, the GPU job) and records failed or skipped steps instead of raising."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_wrapper_parses_and_says_so_without_a_gpu(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has a GPU")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "gpu_check: no CUDA GPU on this machine; nothing to check"
    assert not (tmp_path / "gpu.json").exists()


def test_dry_run_builds_the_inputs_and_prints_the_steps(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--dry-run", "--out", str(tmp_path / "gpu.json")])
    assert gpu_check.main() == 0
    out = capsys.readouterr().out
    assert "1.03B parameters" in out and "mfu (ZeRO-2, ZeRO-3" in out and "merge (TIES" in out
    assert not (tmp_path / "gpu.json").exists()


def test_the_gpu_job_places_every_stage_on_cuda(tmp_path):
    from pipelines.placement import placement
    from pipelines.spec import parse_job

    spec = parse_job(gpu_check.gpu_job(tmp_path), "gpu-demo.yaml")
    assert spec.compute.accelerator == "cuda" and spec.train.num_workers == spec.testbed.num_workers == 1 and spec.train.bf16
    assert placement(spec).ray_options() == {"num_cpus": 1, "num_gpus": 0.25}


def test_peak_table_and_mfu_arithmetic():
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0 and gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Some Future GPU") is None


def test_a_failed_step_is_recorded_and_the_next_still_runs_and_an_exhausted_budget_skips():
    steps = gpu_check.Steps(budget_s=5)
    assert steps.run("boom", lambda: 1 / 0, needs_s=1) == {}
    assert steps.run("fine", lambda: {"x": 1}, needs_s=1) == {"x": 1}
    steps.deadline = time.time()
    assert steps.run("late", lambda: {"x": 2}, needs_s=60) == {}
    assert steps.outcomes["boom"]["status"] == "failed" and "ZeroDivisionError" in steps.outcomes["boom"]["error"]
    assert steps.outcomes["fine"]["status"] == "ok" and steps.outcomes["late"]["status"] == "skipped"
