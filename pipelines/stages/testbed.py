"""Stage `testbed`: the embedded default's data and base model, built from nothing.

Inputs: the job's `testbed` section and skill list. Outputs (under `<root>/testbed/`):
- `data-<key>/<skill>/{train,test}.jsonl` for every testbed skill the job names, plus `general`;
- when `base: testbed`, `base-v1-<key>/`: an HF checkpoint (Llama family by default) pretrained
  from scratch on `general` through the same Ray Train + DeepSpeed path as the train stage.
Logs: the pretraining loss per step, DeepSpeed engine class and ZeRO stage.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from graft.data import write_jsonl
from graft.testbed.models import init_model, model_config
from graft.testbed.skills import generate
from graft.testbed.tokenizer import save_char_tokenizer
from pipelines.cache import content_key, file_digest, folder_identity
from pipelines.context import RunContext, StageResult
from pipelines.training.trainer import TrainRequest, run_training

NAME = "testbed"
GENERATOR_VERSION = 1


def run(ctx: RunContext) -> StageResult:
    spec, tb = ctx.spec, ctx.spec.testbed
    result = StageResult(NAME)
    wanted = sorted({"general", *(s.name for s in spec.skills if s.train is None)})
    data: dict[str, dict[str, str]] = {}
    for skill in wanted:
        n_train = tb.pretrain_examples if skill == "general" else tb.train_examples
        key = content_key(GENERATOR_VERSION, skill, n_train, tb.eval_examples, spec.seed)

        def build_data(tmp: Path, run, skill=skill, n_train=n_train) -> dict[str, float]:
            write_jsonl(tmp / "train.jsonl", generate(skill, "train", n_train, spec.seed))
            write_jsonl(tmp / "test.jsonl", generate(skill, "test", tb.eval_examples, spec.seed))
            return {"train_examples": n_train, "test_examples": tb.eval_examples}

        folder = ctx.run_item(NAME, f"data-{skill}", key, {"skill": skill, "seed": spec.seed}, build_data, result)
        data[skill] = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl"), "key": key}
    for s in spec.skills:
        if s.train is not None:
            data[s.name] = {"train": str(s.train.resolve()), "test": str(s.eval.resolve()),
                            "key": content_key(file_digest(s.train), file_digest(s.eval))}
    result.info["data"] = data

    if spec.base == "testbed":
        base_key = content_key(tb, spec.train.accelerator, data["general"]["key"], spec.seed)

        def build_base(tmp: Path, run) -> dict[str, float]:
            with tempfile.TemporaryDirectory(dir=ctx.root) as init:
                tok = save_char_tokenizer(init)
                cfg = model_config(tb.family, tb.size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)
                init_model(cfg, spec.seed, init)
                req = TrainRequest(
                    model_path=init, tokenizer_path=init, data_path=data["general"]["train"], mode="full",
                    steps=tb.pretrain_steps, batch_size=tb.batch_size, lr=tb.pretrain_lr, seed=spec.seed,
                    zero_stage=tb.zero_stage, num_workers=tb.num_workers,
                    accelerator=spec.train.accelerator, warmup_steps=min(100, tb.pretrain_steps // 10),
                    threads_per_worker=spec.train.cpus_per_worker, deepspeed=spec.train.deepspeed,
                    tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id)
                ctx.log(f"  testbed/base-v1: pretraining a {tb.family}-{tb.size} model for {tb.pretrain_steps} steps")
                run_training(req, ctx.root / "ray_train", tmp, "testbed-base-v1")
            info = json.loads((tmp / "train_info.json").read_text())
            run.params({"deepspeed.engine_class": info["engine_class"], "deepspeed.zero_stage": info["zero_stage"],
                        "deepspeed.world_size": info["world_size"], "model.family": tb.family, "model.size": tb.size})
            return {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"]}

        base = ctx.run_item(NAME, "base-v1", base_key, tb.model_dump(mode="json"), build_base, result)
        result.info["base"], result.info["base_key"] = str(base), base_key
    else:
        base = Path(spec.base).expanduser()
        if not base.is_dir():
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(spec.base, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
        result.info["base"], result.info["base_key"] = str(base.resolve()), folder_identity(base)
    result.info["tokenizer"] = str(Path(spec.tokenizer).resolve()) if spec.tokenizer else result.info["base"]
    return result
