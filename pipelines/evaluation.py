"""Scoring models, shared by the stages that report accuracy (`evaluate`, `merge_study`).

`evaluate_model` runs as a Ray task: it loads one model (a checkpoint, a base with an expert, or a routed
folder) and scores it by exact match on each skill's held-out file. `harness_model` runs lm-eval's tasks on one
model the same way (`graft.harness`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.cache import Ref
from pipelines.placement import Placement
from pipelines.spec import EvaluateSpec, JobSpec


@dataclass(frozen=True)
class EvaluateRequest:
    """Every model scored and every held-out file; the report's content key is the hash of all of it."""

    models: tuple[tuple[str, Ref, Ref | None], ...]  # (name, base or routed folder, expert or None)
    expert_kind: str
    tokenizer: Ref
    tests: tuple[tuple[str, Ref], ...]
    settings: EvaluateSpec
    trust_remote_code: bool
    placement: Placement


def evaluate_model(model: Ref, expert: Ref | None, req: EvaluateRequest, cache_dir: str,
                   allow_base_drift: bool = False) -> dict[str, float]:
    """Accuracy of one model (the base, an expert of it, or a routed folder) on each skill's held-out file (a Ray task).
    `allow_base_drift`: a routed folder's packs may have been made for another version of its base (the caller knows)."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match

    req.placement.enter()
    ev = req.settings
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    loaded = open_model(model, expert, req.expert_kind, req.placement, req.trust_remote_code, cache_dir, allow_base_drift, merged=True)
    return {skill: exact_match(loaded, tok, read_jsonl(test.path)[:ev.examples], ev.max_new_tokens, ev.batch_size)
            for skill, test in req.tests}


def open_model(model: Ref, expert: Ref | None, expert_kind: str, where: Placement, trust_remote_code: bool, cache_dir: str,
               allow_base_drift: bool = False, merged: bool = False):
    """One model, on `where`'s device and in its dtype: the base, an expert of it, or a routed folder as a routed model
    (so routing is what gets measured). An expert's adapter is merged into the base with `merged` (graftline's own
    loop), else kept as an adapter, as outside tools (lm-eval) run it."""
    from graft.experts import Expert
    from graft.fingerprint import DigestCache
    from graft.lora import load_with_adapter
    from graft.routing import RoutedModel, is_routed

    load = where.load_options(trust_remote_code)
    if is_routed(model.path):
        return RoutedModel.load(model.path, allow_base_drift=allow_base_drift, digest_cache=DigestCache(cache_dir),
                                options=load)
    if expert is not None:
        loaded = Expert(Path(expert.path), expert_kind)
        return (loaded.load if merged else loaded.open)(model.path, options=load)
    return load_with_adapter(model.path, None, options=load)


@dataclass(frozen=True)
class HarnessRequest:
    """lm-eval tasks run on every model of a job; its content key covers the models, each task file named, the
    settings and the placement."""

    models: tuple[tuple[str, Ref, Ref | None], ...]  # as EvaluateRequest's
    expert_kind: str
    tokenizer: Ref
    entries: tuple[tuple[str, str], ...]  # (what the job names: a task name, a YAML file or a folder; its identity)
    settings: EvaluateSpec
    placement: Placement
    trust_remote_code: bool


def harness_model(model: Ref, expert: Ref | None, entry: str, req: HarnessRequest, cache_dir: str) -> dict:
    """lm-eval's results for one model on one entry of `evaluate.harness` (a Ray task)."""
    from transformers import AutoTokenizer

    from graft.harness import run_tasks, select_tasks

    req.placement.enter()
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    loaded = open_model(model, expert, req.expert_kind, req.placement, req.trust_remote_code, cache_dir)
    return run_tasks(loaded, tok, select_tasks([entry]), limit=req.settings.examples, batch_size=req.settings.batch_size)


def entry_identity(entry: str) -> str:
    """What an `evaluate.harness` entry stands for, as a key: a built-in name by itself; a YAML file or folder by the
    contents of its task files and of the local data files they name (so editing either reruns the evaluation)."""
    import hashlib

    from graft.harness import data_files, task_files
    from pipelines.cache import file_digest

    if not Path(entry).expanduser().exists():
        return entry
    h = hashlib.sha256()
    for f in task_files(entry):
        h.update(file_digest(f).encode())
        for data in data_files(f):
            h.update(file_digest(data).encode())
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class GeneralSource:
    """What a job's retained general ability is measured on: one of a job dataset's held-out split, a JSONL file scored
    whole, or an lm-eval entry (its first metric)."""

    label: str
    dataset: str | None = None
    file: str | None = None
    task: str | None = None


def general_source(spec: JobSpec) -> GeneralSource:
    """`evaluate.general` when set; else the testbed's `general` on a testbed base; else the held-out part of
    `train.replay_data` when it is a file (the testbed stage splits it; training replays the rest); else
    `graft.router_none` (a file scored whole, or a testbed skill's held-out split)."""
    from graft.testbed.skills import SKILLS

    g = spec.evaluate.general
    if g is not None:
        if g in SKILLS:
            return GeneralSource(f"testbed skill {g!r} (evaluate.general)", dataset=g)
        if g.endswith(".jsonl"):
            return GeneralSource(f"{g} (evaluate.general)", file=g)
        return GeneralSource(f"lm-eval task {g} (evaluate.general)", task=g)
    if spec.base == "testbed":
        return GeneralSource("testbed skill 'general'", dataset="general")
    rd, rn = spec.train.replay_data, spec.graft.router_none
    if rd not in SKILLS and Path(rd).is_file():
        return GeneralSource(f"held-out part of {rd} (train.replay_data)", dataset=rd)
    if rn not in SKILLS:
        return GeneralSource(f"{rn} (graft.router_none)", file=rn)
    return GeneralSource(f"testbed skill {rn!r} (graft.router_none)", dataset=rn)
