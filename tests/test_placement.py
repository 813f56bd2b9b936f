"""Device, dtype, threads and Ray resources of every stage's model tasks come from one place: `compute` in the job."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from graft.experts import Expert
from graft.loading import LoadOptions
from graft.lora import load_with_adapter
from graft.port import ported_model
from pipelines.placement import Placement, placement
from pipelines.spec import SpecError, parse_job

ROOT = Path(__file__).resolve().parent.parent


def spec(**sections):
    return parse_job({"name": "p", "skills": [{"name": "add"}], **sections}, "job.yaml")


def test_the_cpu_is_the_default_one_thread_float32_no_gpu():
    where = placement(spec())
    assert where == Placement("cpu", "float32", 0.0, 1)
    assert where.ray_options() == {"num_cpus": 1, "num_gpus": 0.0}
    assert where.load_options(False) == LoadOptions("float32", "cpu", False)


def test_cuda_places_model_tasks_in_bfloat16_on_a_share_of_a_gpu():
    where = placement(spec(compute={"accelerator": "cuda", "gpus_per_task": 0.25, "cpus_per_task": 4}))
    assert where == Placement("cuda", "bfloat16", 0.25, 4)
    assert where.ray_options() == {"num_cpus": 4, "num_gpus": 0.25}
    assert where.load_options(True) == LoadOptions("bfloat16", "cuda", True)


def test_train_accelerator_is_refused_with_where_it_went():
    with pytest.raises(SpecError, match=r"job.yaml: train: accelerator: moved to compute.accelerator"):
        spec(train={"accelerator": "cuda"})
    with pytest.raises(SpecError, match=r"compute.gpus_per_task"):
        spec(compute={"gpus_per_task": 2})


def test_no_stage_hard_codes_its_device_dtype_or_ray_resources():
    """Every model task is submitted with its placement's resources and opens models through graft.loading."""
    offenders = []
    for path in sorted((ROOT / "pipelines" / "stages").glob("*.py")) + sorted((ROOT / "graft").rglob("*.py")):
        text = path.read_text()
        if path.parent.name in ("stages", "merge") and path.name in ("merge.py", "executor.py"):
            continue  # merging streams tensors by ranges on the CPU, one thread per tensor being merged: CPU work by design
        for pattern in (r"ray\.remote\(num_cpus=1\)", r"dtype=torch\.float32, (use_safetensors|trust_remote_code)",
                        r"set_num_threads\(1\)"):
            offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in re.finditer(pattern, text)]
    assert offenders == []


def test_models_open_in_the_dtype_asked_for(base_model, adapter):
    merged = load_with_adapter(base_model, adapter, options=LoadOptions("bfloat16"))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    expert = Expert(adapter).load(base_model, options=LoadOptions("bfloat16"))
    assert {p.dtype for p in expert.parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError):
        load_with_adapter(base_model, adapter, False)  # a stray trust_remote_code bool is not taken for options


def test_a_patch_is_added_to_low_precision_weights_in_float32(base_model, adapter):
    deltas = Expert(adapter).deltas(base_model)
    bf16 = LoadOptions("bfloat16")
    base = dict(load_with_adapter(base_model, None, options=bf16).named_parameters())
    ported = dict(ported_model(base_model, deltas, options=bf16).named_parameters())
    for key, delta in deltas.items():
        expected = (base[key].float() + delta.dense()).to(torch.bfloat16)  # the delta is not rounded to bf16 before adding
        assert torch.equal(ported[key], expected), key
