"""Stage `testbed`: the job's inputs — the embedded default's data and models built from nothing, or the user's.

Reads nothing; writes `Base`, `Datasets` and `Models`; uses the `testbed` section and, for training the
testbed models, `train` (DeepSpeed overrides, workers, checkpoints). Outputs (under `<root>/testbed/`):
- `data-<skill>-s<seed>-<key>/{train,test}.jsonl` for every testbed skill the job or a model needs;
- when `base: testbed`, the models `testbed.models` names (base-v1 at least; see
  `graft.testbed.recipes`), each an HF checkpoint folder, all trained in one Ray Train run through
  the same DeepSpeed loop as the train stage (the per-run start-up cost is paid once), with the same
  checkpoints and resumption (`train.checkpoint_every`, `train.max_failures`) and `train.deepspeed`
  applied. Each model's content key is its whole `TrainRequest`'s; each new model is checked against
  the checkpoint it started from (`graft.model_checks.check_checkpoint`) before it is committed.
Logs: per model, the loss per step, DeepSpeed engine class, effective ZeRO stage and world size.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from graft.data import read_jsonl, split_holdout, write_jsonl
from graft.model_checks import check_checkpoint
from graft.testbed.models import init_model, model_config
from graft.testbed.recipes import DataRef, Recipe
from graft.testbed.skills import REVISIONS, SKILLS, generate
from graft.testbed.tokenizer import save_char_tokenizer
from pipelines.artifacts import Base, Checkpoint, Datasets, Models, Split
from pipelines.cache import Ref, content_key, file_digest
from pipelines.context import Item, RunContext, StageResult
from pipelines.inputs import checkpoint_ref
from pipelines.spec import JobSpec
from pipelines.training.deepspeed_config import GRAD_CLIP, build_deepspeed_config
from pipelines.training.trainer import TrainJob, TrainRequest, run_training

NAME = "testbed"
READS: tuple[type, ...] = ()
WRITES = (Base, Datasets, Models)
SECTIONS = ("testbed", "train")
GENERATOR_VERSION = 3


def _data(ctx: RunContext, refs: list[DataRef], result: StageResult) -> dict[DataRef, dict[str, str]]:
    """Each dataset written once; keyed by its full reference (two sizes of one skill are two datasets)."""
    tb = ctx.spec.testbed
    out = {}
    unique = sorted(set(refs), key=lambda r: (r.name, r.n))
    for ref in unique:
        label = ref.name if [r.name for r in unique].count(ref.name) == 1 else f"{ref.name}-n{ref.n}"
        key = content_key(GENERATOR_VERSION, ref, tb.eval_examples, *([REVISIONS[ref.skill]] if ref.skill in REVISIONS else []))

        def build(tmp: Path, run, ref=ref) -> dict[str, float]:
            train, test = generate(ref.skill, "train", ref.n, ref.seed), generate(ref.skill, "test", tb.eval_examples, ref.seed)
            write_jsonl(tmp / "train.jsonl", train)
            write_jsonl(tmp / "test.jsonl", test)
            return {"train_examples": len(train), "test_examples": len(test)}

        folder = ctx.run_item(NAME, f"data-{label}", key, {"skill": ref.skill, "seed": ref.seed, "n": ref.n}, build, result)
        out[ref] = {"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl"), "key": key}
    return out


def run(ctx: RunContext) -> StageResult:
    from pipelines.recipes import recipe_of  # the recipes know the stages, this one among them

    spec, tb = ctx.spec, ctx.spec.testbed
    result = StageResult(NAME)
    recipes: list[Recipe] = []
    if spec.base == "testbed":
        recipes = tb.recipes(sorted({"base-v1", *tb.models}), spec.seed)
    refs = [DataRef(s.name, tb.pretrain_examples if s.name == "general" else tb.train_examples, spec.seed)
            for s in spec.skills if s.train is None]
    refs.append(DataRef("general", tb.pretrain_examples, spec.seed))
    named = {s.name for s in spec.skills}
    refs += [DataRef(s, tb.train_examples, spec.seed) for s in recipe_of(spec.recipe).testbed_skills(spec)
             if s in SKILLS and s not in named and s != "general"]
    if spec.train.replay_data in SKILLS:
        refs.append(DataRef(spec.train.replay_data, tb.pretrain_examples, spec.seed))
    for r in recipes:
        refs += [r.data] + ([r.replay] if r.replay else [])
    data = _data(ctx, refs, result)
    rd = spec.train.replay_data
    replay = _replay_split(ctx, Path(rd), result) if rd not in SKILLS and Path(rd).is_file() else None
    result.metrics.clear()  # the summary's headline metrics are the models', not the data files'
    # what the later stages see by name: the job's own skill sets win over sets made for a model recipe
    by_name = {ref.skill: _split(data[ref]) for ref in reversed(refs) if ref.seed == spec.seed}
    if replay is not None:
        by_name[spec.train.replay_data] = replay
    for s in spec.skills:
        if s.train is not None:
            key = content_key(file_digest(s.train), file_digest(s.eval))
            by_name[s.name] = Split(Ref(str(s.train.resolve()), f"{key}:train"), Ref(str(s.eval.resolve()), f"{key}:test"))
    models: dict[str, Checkpoint] = {}
    if recipes:
        paths = _models(ctx, recipes, data, result)
        models = {m: Checkpoint(Ref(str(p), result.keys[m]), Ref(str(p), result.keys[m])) for m, p in paths.items()}
        model = models["base-v1"].model
    else:
        model = checkpoint_ref(spec.base)
    tokenizer = checkpoint_ref(spec.tokenizer) if spec.tokenizer else model
    result.artifacts += [Base(model, tokenizer), Datasets(by_name), Models(models)]
    return result


def _replay_split(ctx: RunContext, path: Path, result: StageResult) -> Split:
    """A user's replay file split once: training replays the rest, and its held-out tail measures general ability."""
    key = content_key("replay-holdout", file_digest(path))

    def build(tmp: Path, run) -> dict[str, float]:
        kept, held = split_holdout(read_jsonl(path))
        write_jsonl(tmp / "train.jsonl", kept)
        write_jsonl(tmp / "test.jsonl", held)
        return {"train_examples": len(kept), "test_examples": len(held)}

    folder = ctx.run_item(NAME, "data-replay", key, {"file": str(path.resolve())}, build, result)
    return _split({"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl"), "key": key})


def _split(files: dict[str, str]) -> Split:
    return Split(Ref(files["train"], f"{files['key']}:train"), Ref(files["test"], f"{files['key']}:test"))


def model_requests(spec: JobSpec, recipes: list[Recipe], data: dict, init_root: Path,
                   output_path: Callable[[str, str], Path]) -> dict[str, TrainRequest]:
    """Each testbed model's whole training request, parents before children.

    A model from scratch starts from `init_root/<name>` (a seeded init, identified by what makes it); a
    model continued from another recipe's starts from that recipe's output, identified by its content key
    (`output_path(name, key)` is where that output is, or will be). `train.deepspeed` applies here as in
    the train stage, so the effective ZeRO stage is the override's when it sets one.
    """
    tb, tr = spec.testbed, spec.train
    reqs: dict[str, TrainRequest] = {}
    for r in recipes:
        if r.parent is None:
            start = Ref(str(init_root / r.name), content_key("testbed-init", GENERATOR_VERSION, r.family, r.size, spec.seed))
        else:
            parent_key = reqs[r.parent].key()
            start = Ref(str(output_path(r.parent, parent_key)), parent_key)
        deepspeed = build_deepspeed_config(micro_batch_size=tb.batch_size, lr=r.lr, steps=r.steps, warmup_steps=min(100, r.steps // 10),
                                           zero_stage=tb.zero_stage, grad_clip=GRAD_CLIP, bf16=False, offload_optimizer=False,
                                           overrides=tr.deepspeed)
        reqs[r.name] = TrainRequest(
            model=start, tokenizer=start, data=_data_ref(data, r.data), mode="full", steps=r.steps, batch_size=tb.batch_size,
            seed=spec.seed, deepspeed=deepspeed, num_workers=tb.num_workers, accelerator=spec.compute.accelerator,
            threads_per_worker=tr.cpus_per_worker, replay=r.replay and _data_ref(data, r.replay), replay_fraction=r.replay_fraction,
            trust_remote_code=spec.trust_remote_code)
    return reqs


def _data_ref(data: dict, ref: DataRef) -> Ref:
    return Ref(data[ref]["train"], f"{data[ref]['key']}:train")


def _models(ctx: RunContext, recipes: list[Recipe], data: dict, result: StageResult) -> dict[str, Path]:
    spec = ctx.spec
    init_root = ctx.root / NAME / ".init"
    reqs = model_requests(spec, recipes, data, init_root, lambda name, key: ctx.output_path(NAME, name, key))
    items = [Item(r.name, reqs[r.name].key(), {"recipe": r.__dict__, "deepspeed.zero_stage": reqs[r.name].zero_stage}) for r in recipes]

    def build(todo) -> dict[str, dict[str, float]]:
        jobs, starts = [], {}
        for r in recipes:
            if r.name not in todo:
                continue
            tmp, run = todo[r.name]
            req = reqs[r.name]
            if r.parent is None:
                tok = save_char_tokenizer(init_root / r.name)
                init_model(model_config(r.family, r.size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id),
                           spec.seed, init_root / r.name)
            elif r.parent in todo:  # the parent trains in this run, ahead of it: its output is still the temporary folder
                parent = Ref(str(todo[r.parent][0]), req.model.key)
                req = dataclasses.replace(req, model=parent, tokenizer=parent)
            starts[r.name] = req.model.path
            jobs.append(TrainJob(req, str(tmp), tracking_uri=ctx.tracker.uri, mlflow_run_id=run.run_id,
                                 system_metrics_every_s=ctx.spec.tracking.system_metrics_every_s))
            ctx.log(f"  testbed/{r.name}: {'from scratch, ' + r.family + '-' + r.size if r.parent is None else 'from ' + r.parent}"
                    f", {r.steps} steps on {r.data.name}, ZeRO-{req.zero_stage}")
        try:
            run_training(jobs, ctx.root / "ray_train", "testbed", checkpoint_every=spec.train.checkpoint_every,
                         max_failures=spec.train.max_failures, log=ctx.log,
                         names={str(tmp): f"testbed/{n}" for n, (tmp, _) in todo.items()})
            # every model checked against the checkpoint it started from, before any is committed
            infos = {name: _checked(tmp, starts[name], spec.trust_remote_code) for name, (tmp, _) in todo.items()}
        finally:
            shutil.rmtree(init_root, ignore_errors=True)
        metrics = {}
        for name, (_, run) in todo.items():
            info = infos[name]
            run.params({"deepspeed.engine_class": info["engine_class"], "deepspeed.world_size": info["world_size"]})
            if info["restarts"]:
                run.tags({"graftline.restarts": str(info["restarts"]), "graftline.resumed_from_step": str(info["resumed_from_step"])})
            metrics[name] = {"final_loss": info["final_loss"], "train_seconds": info["train_seconds"]}
        return metrics

    return ctx.run_items(NAME, items, build, result)


def _checked(folder: Path, start: str, trust_remote_code: bool) -> dict:
    """`folder`'s train_info.json, once the model in it passes `check_checkpoint` against `start`."""
    check_checkpoint(folder, start, trust_remote_code=trust_remote_code)
    return json.loads((folder / "train_info.json").read_text())
