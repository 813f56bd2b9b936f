"""Scoring models on held-out files, shared by the stages that report accuracy (`evaluate`, `merge_study`).

`evaluate_model` runs as a Ray task: it loads one model (a checkpoint, a base with an expert, or a routed
folder) and scores it by exact match on each skill's held-out file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.cache import Ref
from pipelines.spec import EvaluateSpec


@dataclass(frozen=True)
class EvaluateRequest:
    """Every model scored and every held-out file; the report's content key is the hash of all of it."""

    models: tuple[tuple[str, Ref, Ref | None], ...]  # (name, base or routed folder, expert or None)
    expert_kind: str
    tokenizer: Ref
    tests: tuple[tuple[str, Ref], ...]
    settings: EvaluateSpec
    trust_remote_code: bool


def evaluate_model(model: Ref, expert: Ref | None, req: EvaluateRequest, cache_dir: str,
                   allow_base_drift: bool = False) -> dict[str, float]:
    """Accuracy of one model (the base, an expert of it, or a routed folder) on each skill's held-out file (a Ray task).
    `allow_base_drift`: a routed folder's packs may have been made for another version of its base (the caller knows)."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match
    from graft.experts import Expert
    from graft.fingerprint import DigestCache
    from graft.lora import load_with_adapter
    from graft.routing import RoutedModel, is_routed

    torch.set_num_threads(1)
    ev = req.settings
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    if is_routed(model.path):
        loaded = RoutedModel.load(model.path, allow_base_drift=allow_base_drift, digest_cache=DigestCache(cache_dir))
    elif expert is not None:
        loaded = Expert(Path(expert.path), req.expert_kind).load(model.path, req.trust_remote_code)
    else:
        loaded = load_with_adapter(model.path, None, req.trust_remote_code)
    return {skill: exact_match(loaded, tok, read_jsonl(test.path)[:ev.examples], ev.max_new_tokens, ev.batch_size)
            for skill, test in req.tests}


