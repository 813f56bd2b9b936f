"""Stage `testbed`: the embedded default's data and models, built from nothing.

Inputs: the job's `testbed` section and skill list. Outputs (under `<root>/testbed/`):
- `data-<skill>-s<seed>-<key>/{train,test}.jsonl` for every testbed skill the job or a model needs;
- when `base: testbed`, the models `testbed.models` names (base-v1 at least; see
  `graft.testbed.recipes`), each an HF checkpoint folder, all trained in one Ray Train run through
  the same DeepSpeed loop as the train stage (the per-run start-up cost is paid once).
Logs: per model, the loss per step, DeepSpeed engine class, ZeRO stage and world size.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from graft.data import write_jsonl
from graft.testbed.models import init_model, model_config
from graft.testbed.recipes import DataRef, Recipe, testbed_recipes
from graft.testbed.skills import SKILLS, generate
from graft.testbed.tokenizer import save_char_tokenizer
from pipelines.cache import content_key, file_digest, folder_identity
from pipelines.context import Item, RunContext, StageResult
from pipelines.training.loop import LOOP_VERSION
from pipelines.training.trainer import TrainRequest, run_training

NAME = "testbed"
GENERATOR_VERSION = 3


def _data(ctx: RunContext, refs: list[DataRef], result: StageResult) -> dict[DataRef, dict[str, str]]:
    """Each dataset written once; keyed by its full reference (two sizes of one skill are two datasets)."""
    tb = ctx.spec.testbed
    out = {}
    unique = sorted(set(refs), key=lambda r: (r.name, r.n))
    for ref in unique:
        label = ref.name if [r.name for r in unique].count(ref.name) == 1 else f"{ref.name}-n{ref.n}"
        key = content_key(GENERATOR_VERSION, ref, tb.eval_examples)

        def build(tmp: Path, run, ref=ref) -> dict[str, float]:
            train, test = generate(ref.skill, "train", ref.n, ref.seed), generate(ref.skill, "test", tb.eval_examples, ref.seed)
            write_jsonl(tmp / "train.jsonl", train)
            write_jsonl(tmp / "test.jsonl", test)
            return {"train_examples": len(train), "test_examples": len(test)}

        folder = ctx.run_item(NAME, f"data-{label}", key, {"skill": ref.skill, "seed": ref.seed, "n": ref.n}, build, result)
        out[ref] = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl"), "key": key}
    return out


def run(ctx: RunContext) -> StageResult:
    spec, tb = ctx.spec, ctx.spec.testbed
    result = StageResult(NAME)
    recipes: list[Recipe] = []
    if spec.base == "testbed":
        recipes = testbed_recipes(
            sorted({"base-v1", *tb.models}), family=tb.family, size=tb.size, seed=spec.seed, pretrain_examples=tb.pretrain_examples,
            pretrain_steps=tb.pretrain_steps, lr=tb.pretrain_lr, evolve_steps=tb.evolve_steps, align_steps=tb.align_steps,
            target_steps=tb.target_steps, source_skill=tb.source_skill, source_family=tb.source_family,
            source_steps=tb.source_steps, source_replay_fraction=tb.source_replay_fraction)
    refs = [DataRef(s.name, tb.pretrain_examples if s.name == "general" else tb.train_examples, spec.seed)
            for s in spec.skills if s.train is None]
    refs.append(DataRef("general", tb.pretrain_examples, spec.seed))
    if spec.train.replay_data in SKILLS:
        refs.append(DataRef(spec.train.replay_data, tb.pretrain_examples, spec.seed))
    for r in recipes:
        refs += [r.data] + ([r.replay] if r.replay else [])
    data = _data(ctx, refs, result)
    result.metrics.clear()  # the summary's headline metrics are the models', not the data files'
    # what the later stages see by skill name: the job's own skill sets win over sets made for a model recipe
    by_skill = {ref.skill: data[ref] for ref in reversed(refs) if ref.seed == spec.seed}
    for s in spec.skills:
        if s.train is not None:
            by_skill[s.name] = {"train": str(s.train.resolve()), "test": str(s.eval.resolve()),
                                "key": content_key(file_digest(s.train), file_digest(s.eval))}
    result.info["data"] = by_skill

    if recipes:
        models = _models(ctx, recipes, data, result)
        result.info["models"] = {m: str(p) for m, p in models.items()}
        result.info["base"], result.info["base_key"] = str(models["base-v1"]), result.keys["base-v1"]
    else:
        base = Path(spec.base).expanduser()
        if not base.is_dir():
            from huggingface_hub import snapshot_download

            base = Path(snapshot_download(spec.base, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
        result.info["base"], result.info["base_key"] = str(base.resolve()), folder_identity(base)
    result.info["tokenizer"] = str(Path(spec.tokenizer).resolve()) if spec.tokenizer else result.info["base"]
    return result


def _models(ctx: RunContext, recipes: list[Recipe], data: dict, result: StageResult) -> dict[str, Path]:
    spec, tb = ctx.spec, ctx.spec.testbed
    keys: dict[str, str] = {}
    for r in recipes:
        keys[r.name] = content_key(r, keys.get(r.parent), data[r.data]["key"], r.replay and data[r.replay]["key"],
                                   tb.batch_size, tb.zero_stage, tb.num_workers, spec.train.accelerator, spec.seed, LOOP_VERSION)
    items = [Item(r.name, keys[r.name], {"recipe": r.__dict__}) for r in recipes]

    def build(todo) -> dict[str, dict[str, float]]:
        init_root = ctx.root / "testbed" / ".init"
        reqs = []
        for r in recipes:
            if r.name not in todo:
                continue
            tmp, run = todo[r.name]
            if r.parent is None:
                init = init_root / r.name
                tok = save_char_tokenizer(init)
                init_model(model_config(r.family, r.size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id),
                           spec.seed, init)
                start = str(init)
            else:
                start = str(todo[r.parent][0] if r.parent in todo else ctx.output_path(NAME, r.parent, keys[r.parent]))
            reqs.append(TrainRequest(
                model_path=start, tokenizer_path=start, data_path=data[r.data]["train"], out_dir=str(tmp), mode="full",
                steps=r.steps, batch_size=tb.batch_size, lr=r.lr, seed=spec.seed, zero_stage=tb.zero_stage,
                num_workers=tb.num_workers, accelerator=spec.train.accelerator, warmup_steps=min(100, r.steps // 10),
                threads_per_worker=spec.train.cpus_per_worker, deepspeed=spec.train.deepspeed,
                replay_path=r.replay and data[r.replay]["train"], replay_fraction=r.replay_fraction,
                tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id))
            ctx.log(f"  testbed/{r.name}: {'from scratch, ' + r.family + '-' + r.size if r.parent is None else 'from ' + r.parent}"
                    f", {r.steps} steps on {r.data.name}")
        try:
            run_training(reqs, ctx.root / "ray_train", "testbed")
        finally:
            shutil.rmtree(init_root, ignore_errors=True)
        metrics = {}
        for name, (tmp, run) in todo.items():
            info = json.loads((tmp / "train_info.json").read_text())
            run.params({"deepspeed.engine_class": info["engine_class"], "deepspeed.zero_stage": info["zero_stage"],
                        "deepspeed.world_size": info["world_size"]})
            metrics[name] = {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"]}
        return metrics

    return ctx.run_items(NAME, items, build, result)
