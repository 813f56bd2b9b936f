"""The GPU check: graftline on one CUDA GPU, in at most 8 minutes, written to `benchmarks/results/gpu.json`.

Run it through `benchmarks/gpu_check.sh` (which exits at once on a machine without a GPU). Steps, each timed and
recorded as ok, failed (with the error) or skipped (with why), so that a short GPU slot always leaves a result:

1. `mfu`: a ~1B-parameter Llama built from scratch (testbed tokenizer) trains a LoRA for `--steps` steps through
   graftline's Ray Train + DeepSpeed loop on one GPU (NCCL), under ZeRO-2 and under ZeRO-3. Reported: tokens/s
   (padded positions, what the GPU computes) and MFU = 6·N·tokens/s over the GPU's bf16 dense peak (`PEAK_BF16_TFLOPS`;
   N = the model's parameters; 6·N is the full fine-tune's count, the convention the issue asks for, so a LoRA's MFU
   is an upper bound on useful work).
2. `demo`: the `graft` recipe on the demo job (`jobs/demo.yaml`: testbed, three skills) with `compute.accelerator:
   cuda`: training on NCCL, score, pack and evaluate as bf16 tasks on the GPU; its wall time and accuracy table.
3. `merge`: a TIES merge of two ~1B checkpoints (the base plus two random deltas). graftline's merge streams
   tensors by ranges on the CPU; it has no GPU path yet, so `merge_gpu_seconds` is null with the reason.

`--dry-run` builds every input that needs no GPU (the configs, the GPU job spec, the parameter count) and prints
the steps, so CI checks this script's logic without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# bf16 dense tensor-core peak per GPU, TFLOP/s, from the vendors' datasheets (SXM parts where there are two)
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
                    "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0}
ONE_B = {"hidden_size": 2048, "num_hidden_layers": 20, "num_attention_heads": 16, "num_key_value_heads": 16,
         "intermediate_size": 5632, "max_position_embeddings": 1024}
BUDGET_S = 8 * 60


def peak_tflops(gpu_name: str) -> float | None:
    """The table's peak for a GPU name as torch reports it (e.g. 'NVIDIA H200'); None for a GPU not in the table."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in gpu_name:
            return value
    return None


def one_b_config(tokenizer):
    """A Llama of about 1B parameters over the testbed's character vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **ONE_B)


def parameter_count(config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def gpu_job(out: Path) -> dict:
    """The demo job, every stage on the GPU: one training worker (one GPU), model tasks on a quarter of it each."""
    from graft.strict_yaml import load_yaml

    spec = load_yaml((REPO / "jobs" / "demo.yaml").read_text())
    spec.update(name="gpu-demo-check", output_dir=str(out), compute={"accelerator": "cuda", "gpus_per_task": 0.25})
    spec["tracking"] = {"experiment": "graftline-gpu-check"}
    spec["train"] = {**spec["train"], "num_workers": 1, "bf16": True}
    spec["testbed"] = {**spec["testbed"], "num_workers": 1}
    return spec


class Steps:
    """Runs steps in order within a time budget; each one's outcome is recorded, never raised."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.time() + budget_s
        self.outcomes: dict[str, dict] = {}

    def run(self, name: str, fn: Callable[[], dict], needs_s: float) -> dict:
        left = self.deadline - time.time()
        if left < needs_s:
            self.outcomes[name] = {"status": "skipped", "why": f"{left:.0f} s of the budget left, the step needs ~{needs_s:.0f} s"}
            return {}
        t0 = time.time()
        try:
            result = fn()
            self.outcomes[name] = {"status": "ok", "seconds": round(time.time() - t0, 1)}
            return result
        except Exception as e:  # a failed step is a result too: recorded with its error, the next step still runs
            self.outcomes[name] = {"status": "failed", "seconds": round(time.time() - t0, 1), "error": f"{type(e).__name__}: {e}",
                                   "trace": traceback.format_exc()[-2000:]}
            print(f"gpu_check: {name} failed: {type(e).__name__}: {e}", flush=True)
            return {}


def mfu_step(work: Path, steps: int, batch: int, length: int, gpu: str) -> dict:
    """LoRA training of the ~1B model under ZeRO-2 and ZeRO-3 through graftline's trainer, on one GPU."""
    from graft.data import write_jsonl
    from graft.testbed.models import init_model
    from graft.testbed.skills import generate
    from graft.testbed.tokenizer import save_char_tokenizer
    from pipelines.cache import Ref
    from pipelines.runtime import ray_session
    from pipelines.training.deepspeed_config import GRAD_CLIP, build_deepspeed_config
    from pipelines.training.trainer import TrainJob, TrainRequest, run_training

    tok = save_char_tokenizer(work / "one-b")
    config = one_b_config(tok)
    init_model(config, 0, work / "one-b")
    n = parameter_count(config)
    rows = [{"prompt": r["prompt"] * 8, "answer": r["answer"] * 8} for r in generate("general", "train", 4000, 0)]
    write_jsonl(work / "long.jsonl", rows)
    base, data = Ref(str(work / "one-b"), "one-b"), Ref(str(work / "long.jsonl"), "long")
    out: dict = {"params": n, "steps": steps, "batch_size": batch, "max_length": length}
    peak = peak_tflops(gpu)
    with ray_session(None):
        for stage in (2, 3):
            ds = build_deepspeed_config(micro_batch_size=batch, lr=1e-4, steps=steps, warmup_steps=10, zero_stage=stage,
                                        grad_clip=GRAD_CLIP, bf16=True, offload_optimizer=False)
            req = TrainRequest(model=base, tokenizer=base, data=data, mode="lora", steps=steps, batch_size=batch, seed=0,
                               deepspeed=ds, num_workers=1, accelerator="cuda", threads_per_worker=4, max_length=length,
                               adapter={"rank": 16, "alpha": 32, "dropout": 0.0,
                                        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
            target = work / f"lora-zero{stage}"
            run_training([TrainJob(req, str(target))], work / "ray_train", f"gpu-check-zero{stage}", checkpoint_every=steps,
                         max_failures=0)
            info = json.loads((target / "train_info.json").read_text())
            tokens = info["steps_per_second"] * batch * length
            out[f"tokens_per_s_zero{stage}"] = round(tokens, 1)
            out[f"mfu_zero{stage}"] = round(6 * n * tokens / (peak * 1e12), 4) if peak else None
            out[f"peak_rss_mb_zero{stage}"] = info["peak_rss_mb"]
    return out


def demo_step(work: Path) -> dict:
    """`graft run` of the demo job on the GPU, as a user would run it."""
    import yaml

    job = work / "gpu-demo.yaml"
    job.write_text(yaml.safe_dump(gpu_job(work / "runs")))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", str(job)], cwd=REPO, capture_output=True, text=True,
                          timeout=BUDGET_S)
    seconds = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"graft run exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    reports = sorted((work / "runs" / "gpu-demo-check" / "evaluate").glob("report-*/eval.json"))
    return {"demo_seconds": round(seconds, 1), "demo_eval": json.loads(reports[-1].read_text()) if reports else None}


def merge_step(work: Path) -> dict:
    """TIES of two ~1B checkpoints (the base plus two random deltas, bf16) with graftline's merge, on the CPU."""
    import torch
    import yaml
    from safetensors.torch import load_file, save_file

    from graft.merge import run_merge

    base = work / "one-b"
    if not base.is_dir():
        raise RuntimeError("the mfu step did not build the ~1B base")
    folders = []
    for i in (1, 2):
        folder = work / f"one-b-ft{i}"
        folder.mkdir()
        gen = torch.Generator().manual_seed(i)
        for f in base.iterdir():
            if f.suffix == ".safetensors":
                tensors = load_file(str(f))
                save_file({k: (v.float() + 1e-3 * torch.randn(v.shape, generator=gen)).to(torch.bfloat16) for k, v in tensors.items()},
                          str(folder / f.name))
            elif f.is_file():
                (folder / f.name).write_bytes(f.read_bytes())
        folders.append(folder)
    config = work / "ties.yml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                                      "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.5}} for f in folders]}))
    t0 = time.time()
    run_merge(config, work / "merged")
    return {"merge_cpu_seconds": round(time.time() - t0, 1), "merge_gpu_seconds": None,
            "merge_gpu_why": "graft.merge streams tensors by ranges on the CPU; it has no GPU path yet"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--commit", default=None, help="the commit checked out, where the tree travels without .git")
    ap.add_argument("--dry-run", action="store_true", help="build what needs no GPU, print the steps, run nothing")
    args = ap.parse_args()
    started = time.time()
    from graft.testbed.tokenizer import build_char_tokenizer
    from pipelines.spec import parse_job

    n = parameter_count(one_b_config(build_char_tokenizer()))
    with tempfile.TemporaryDirectory(prefix="graftline-gpu-check-") as tmp:
        parse_job(gpu_job(Path(tmp)), "gpu-demo.yaml")  # the GPU job is a valid job
    if args.dry_run:
        print(f"gpu_check (dry run): ~1B model of {n / 1e9:.2f}B parameters; steps: mfu (ZeRO-2, ZeRO-3, {args.steps} steps, "
              f"batch {args.batch_size} x {args.max_length}), demo (graft run on cuda), merge (TIES of two ~1B checkpoints); "
              f"results to {args.out}")
        return 0
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check")
        return 0
    gpu = torch.cuda.get_device_name(0)
    steps = Steps(BUDGET_S)
    with tempfile.TemporaryDirectory(prefix="graftline-gpu-check-") as tmp:
        work = Path(tmp)
        mfu = steps.run("mfu", lambda: mfu_step(work, args.steps, args.batch_size, args.max_length, gpu), needs_s=120)
        demo = steps.run("demo", lambda: demo_step(work), needs_s=150)
        merge = steps.run("merge", lambda: merge_step(work), needs_s=60)
    result = {
        "gpu": gpu, "gpu_memory_gb": round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1),
        "peak_bf16_tflops": peak_tflops(gpu),
        "mfu_zero2": mfu.get("mfu_zero2"), "mfu_zero3": mfu.get("mfu_zero3"),
        "tokens_per_s": {"zero2": mfu.get("tokens_per_s_zero2"), "zero3": mfu.get("tokens_per_s_zero3")},
        "demo_seconds": demo.get("demo_seconds"), "merge_gpu_seconds": merge.get("merge_gpu_seconds"),
        "merge_cpu_seconds": merge.get("merge_cpu_seconds"), "details": {"mfu": mfu, "demo": demo, "merge": merge},
        "steps": steps.outcomes,
        "provenance": {"commit": args.commit or _commit(), "command": "bash benchmarks/gpu_check.sh", "seeds": [0],
                       "wall_seconds": round(time.time() - started, 1), "machine": f"{platform.machine()} {os.cpu_count()} cores, {gpu}",
                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("gpu", "mfu_zero2", "mfu_zero3", "tokens_per_s", "demo_seconds", "merge_cpu_seconds")}))
    print(f"gpu_check: wrote {args.out}; steps: " + ", ".join(f"{k} {v['status']}" for k, v in steps.outcomes.items()))
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    sys.exit(main())
