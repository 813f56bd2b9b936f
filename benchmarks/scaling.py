"""Scale-out on one machine: importance-scoring throughput and DeepSpeed training steps/s, 1 vs 2 workers.

Scoring: the score stage's Ray task (`pipelines.stages.score.score_shard`), fanned out over N
workers, each held to one core (torch threads = the task's Ray CPUs); throughput = tokens scored / wall
seconds, timed after a warm-up round so process start-up and imports are not counted.
Training: Ray Train + DeepSpeed ZeRO-2 LoRA runs with N workers (per-worker batch fixed, so global
batch grows with N); steps/s is the training loop's own rate (`train_info.json`), start-up excluded.

    .venv/bin/python benchmarks/scaling.py [--out benchmarks/results/scaling.json]

Writes {"machine", "scoring_tokens_per_s": {"1": x, "2": y}, "training_steps_per_s": {"1": x, "2": y},
        "scoring_efficiency": y / (2x), "model": ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from provenance import provenance  # the benchmarks folder is on the path of a script run from it

from graft.data import encode_examples, read_jsonl, write_jsonl
from graft.testbed.models import init_model, model_config
from graft.testbed.skills import generate
from graft.testbed.tokenizer import save_char_tokenizer


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    ap.add_argument("--examples", type=int, default=256, help="examples scored per round")
    ap.add_argument("--steps", type=int, default=200, help="training steps per run")
    ap.add_argument("--size", default="small")
    args = ap.parse_args()
    started = time.time()

    import ray

    from pipelines.cache import Ref
    from pipelines.placement import Placement
    from pipelines.runtime import ray_session
    from pipelines.stages.score import ScoreRequest, score_shard
    from pipelines.training.deepspeed_config import GRAD_CLIP, build_deepspeed_config
    from pipelines.training.trainer import TrainJob, TrainRequest, run_training

    with tempfile.TemporaryDirectory(prefix="graftline-scaling-") as tmp:
        tmp = Path(tmp)
        tok = save_char_tokenizer(tmp / "base")
        init_model(model_config("llama", args.size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id), 0, tmp / "base")
        rows = generate("reverse", "train", max(args.examples, 2000), 0)
        write_jsonl(tmp / "data.jsonl", rows)
        tokens = sum(len(ids) for ids, _ in encode_examples(tok, read_jsonl(tmp / "data.jsonl")[: args.examples], 64))
        scoring, training = {}, {}
        base, data = Ref(str(tmp / "base"), "base"), Ref(str(tmp / "data.jsonl"), "data")
        with ray_session(None, num_cpus=os.cpu_count()):
            task = ray.remote(num_cpus=1)(score_shard)
            for n in (1, 2):
                req = ScoreRequest(base=base, expert=None, expert_kind="lora", tokenizer=base, data=data, method="fisher", shards=n,
                                   examples=args.examples, batch_size=1, max_length=64, trust_remote_code=False,
                                   placement=Placement("cpu", "float32", 0.0, 1))

                def round_(req=req, n=n) -> float:
                    t0 = time.time()
                    ray.get([task.remote(req, i) for i in range(n)])
                    return time.time() - t0

                round_()  # warm-up: worker processes started and imports done
                scoring[str(n)] = tokens / min(round_() for _ in range(2))
                print(f"scoring, {n} worker(s): {scoring[str(n)]:.0f} tokens/s", flush=True)
            for n in (1, 2):
                out = tmp / f"train-{n}"
                ds = build_deepspeed_config(micro_batch_size=16, lr=1e-3, steps=args.steps, warmup_steps=10, zero_stage=2,
                                            grad_clip=GRAD_CLIP, bf16=False, offload_optimizer=False)
                req = TrainRequest(model=base, tokenizer=base, data=data, mode="lora", steps=args.steps, batch_size=16, seed=0,
                                   deepspeed=ds, num_workers=n, adapter={"rank": 8, "alpha": 16, "dropout": 0.0,
                                                                      "target_modules": ["q_proj", "v_proj", "down_proj"]})
                run_training([TrainJob(req, str(out))], tmp / "ray_train", f"scaling-{n}", checkpoint_every=args.steps, max_failures=0)
                training[str(n)] = json.loads((out / "train_info.json").read_text())["steps_per_second"]
                print(f"training, {n} worker(s): {training[str(n)]:.2f} steps/s", flush=True)
    result = {"provenance": provenance([0], started), "machine": machine(), "model": f"llama-{args.size}", "scoring_tokens_per_s": scoring,
              "training_steps_per_s": training, "scoring_efficiency": scoring["2"] / (2 * scoring["1"]),
              "notes": "scoring: per-example Fisher on `reverse`, one core per worker; training: LoRA r=8, "
                       "ZeRO-2, per-worker batch 16 (global batch 16·N), gloo on CPU"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
