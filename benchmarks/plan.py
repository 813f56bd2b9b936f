"""What `graft plan` says for real model sizes: per-worker peak memory of the train, score, pack and evaluate stages
for Llama-3-8B, Qwen2-7B and a Llama-70B, and whether each fits an 80 GB GPU.

Each model is its published architecture written as a config.json in a scratch folder (no weights) and sized on the
meta device through the same path a job with a local base takes (`pipelines.plan.plan_job`). The job is the `graft`
recipe on GPUs: LoRA r=8 on every attention and MLP projection, DeepSpeed ZeRO-3 in bf16 over 8 workers, 4 rows of
512 tokens per worker, score and evaluate at their default batch sizes (1 and 64 rows), model tasks in bfloat16;
the node is 8 GPUs of 80 GB (GB = 10^9 bytes) with 1000 GB of RAM. Nothing is trained or loaded: seconds on a CPU.

Writes `benchmarks/results/plan.json`:
  {"rows": [{"model", "params", "stage", "zero_stage", "gpus", "peak_gb_per_worker", "fits_80gb", "host_gb_per_worker"}],
   "job", "node", "provenance"}
`peak_gb_per_worker` is on the worker's GPU; `host_gb_per_worker` is the host memory it also needs (packing without
calibration works on the host only).

    .venv/bin/python benchmarks/plan.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402

from pipelines.plan import GB, Node, plan_job  # noqa: E402
from pipelines.spec import parse_job  # noqa: E402

MODELS = {
    "llama-3-8b": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False)),
    "llama-70b": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                                intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False)),
}
STAGES = ("train", "score", "pack", "evaluate")
NODE = Node(gpus=8, gpu_gb=80.0, ram_gb=1000.0, cpus=96)
GPU_LIMIT = 80 * GB
JOB = {"name": "plan", "skills": [{"name": "reverse"}], "compute": {"accelerator": "cuda"},
       "train": {"method": "lora", "lora": {"rank": 8}, "zero_stage": 3, "num_workers": 8, "bf16": True, "batch_size": 4,
                 "max_length": 512}}


def base_folder(root: Path, name: str) -> Path:
    """`name`'s config.json in a folder, beside an empty safetensors file (the spec checks a base holds one): no weights."""
    from transformers import AutoConfig

    family, sizes = MODELS[name]
    folder = root / name
    folder.mkdir()
    AutoConfig.for_model(family, **sizes).save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def rows_for(name: str, folder: Path) -> list[dict]:
    plan = plan_job(parse_job({**JOB, "base": str(folder)}, f"{name}.yaml"), NODE)
    return [{"model": name, "params": plan.base.shape.params, "stage": p.stage, "zero_stage": p.zero_stage, "gpus": p.gpus,
             "peak_gb_per_worker": round(p.peak / GB, 2), "fits_80gb": p.peak <= GPU_LIMIT,
             "host_gb_per_worker": round(p.host / GB, 2)}
            for p in plan.stages if p.stage in STAGES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/plan.json")
    args = ap.parse_args()
    started = time.time()
    with tempfile.TemporaryDirectory() as scratch:
        rows = [row for name in MODELS for row in rows_for(name, base_folder(Path(scratch), name))]
    for row in rows:
        print(json.dumps(row))
    result = {"rows": rows, "job": JOB, "node": asdict(NODE), "provenance": provenance([0], started)}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
