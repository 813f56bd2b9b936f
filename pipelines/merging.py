"""The merge study's merges as mergekit-style configs, and running one (shared by the `merge` and `evolve` stages).

A study merge is a config `graft merge` accepts as it is: the two experts as `models`, their shared base as
`base_model` where the method takes deltas against it, the base's tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipelines.spec import JobSpec, StudyMerge

MERGE_FILE = "merge.yaml"


def measured_skills(spec: JobSpec) -> list[str]:
    """What the study measures every model on: the vocabulary in both languages, and general data in both."""
    ms = spec.merge_study
    return list(dict.fromkeys([ms.domain_lang2, ms.domain, ms.general, ms.language]))


def merge_config(method: str, base_model: str | None, language: tuple[str, dict[str, Any]], domain: tuple[str, dict[str, Any]],
                 parameters: dict[str, Any], dtype: str, tokenizer: str) -> dict[str, Any]:
    """The mergekit-style config (graft.merge.config) merging the two experts, as a user would write it."""
    config: dict[str, Any] = {"merge_method": method, "models": [{"model": path, "parameters": dict(params)} for path, params in
                                                                 (language, domain)], "dtype": dtype, "tokenizer_source": tokenizer}
    if base_model is not None:
        config["base_model"] = base_model
    if parameters:
        config["parameters"] = dict(parameters)
    return config


def study_config(m: StudyMerge, base: str, language: str, domain: str, dtype: str, tokenizer: str) -> dict[str, Any]:
    """One entry of `merge_study.merges` as a merge config: base_model per the method's policy and the entry's `base`."""
    from graft.merge.base import BasePolicy, spec_of

    base_model = None if spec_of(m.method).base is BasePolicy.IGNORED else language if m.base == "language" else base
    return merge_config(m.method, base_model, (language, m.language), (domain, m.domain), m.parameters, dtype, tokenizer)


def write_merge(config: dict[str, Any], folder: str, seed: int) -> dict[str, float]:
    """Run one merge config into `folder/model` with the config beside it as `folder/merge.yaml` (a Ray task)."""
    import torch

    from graft.merge.config import parse_merge_config
    from graft.merge.executor import run_merge

    torch.set_num_threads(1)
    out = Path(folder)
    path = out / MERGE_FILE
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    run_merge(parse_merge_config(config, path), out / "model", seed=seed, workers=1)
    return {}


