"""What the testbed benchmarks share: the testbed job's outputs, and accuracy of a base plus deltas.

The method benchmarks (skillpack, continual) start from the experts that `jobs/testbed.yaml` trains;
running the job through the pipeline reuses whatever it already built under its output folder, so
they cost only their own grafting and evaluation once the testbed exists.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.data import read_jsonl
from graft.evaluation import exact_match
from graft.importance import load_scores
from graft.lora import LowRankDelta, read_lora_deltas
from pipelines.artifacts import Experts, Base, Datasets, Packs, Scores
from pipelines.driver import run_job
from pipelines.spec import JobSpec, load_job


TESTBED_JOB = "runs/bench-testbed/testbed-s0.yaml"  # written by benchmarks/testbed.py for its first seed


def machine() -> str:
    return f"{platform.node()} {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, CPU"


@dataclass
class Testbed:
    """The base, its tokenizer, each skill's expert deltas, importance scores, packs and held-out sets."""

    spec: JobSpec
    base: str
    tokenizer_path: str
    tokenizer: object
    skills: list[str]
    experts: dict[str, dict[str, LowRankDelta]]
    adapters: dict[str, Path]
    scores: dict[str, dict[str, torch.Tensor]]
    packs: dict[str, Path]
    tests: dict[str, list[dict[str, str]]]
    train: dict[str, list[dict[str, str]]]


def load_testbed(job: str | Path) -> Testbed:
    """Run (or reuse) the testbed job and collect what the method benchmarks need from it."""
    from transformers import AutoTokenizer

    if not Path(job).is_file():
        raise SystemExit(f"{job}: no such testbed job; build the testbed first (python benchmarks/testbed.py)")
    spec = load_job(job)
    board = run_job(spec, Path(job)).board
    base, data = board.get(Base), board.get(Datasets)
    adapters, scores, packs = board.get(Experts), board.get(Scores), board.get(Packs)
    skills = [s.name for s in spec.skills]
    return Testbed(
        spec=spec, base=base.model.path, tokenizer_path=base.tokenizer.path, tokenizer=AutoTokenizer.from_pretrained(base.tokenizer.path),
        skills=skills,
        experts={s: read_lora_deltas(adapters[s].path) for s in skills},
        adapters={s: Path(adapters[s].path) for s in skills},
        scores={s: load_scores(Path(scores[s].path) / "scores.safetensors") for s in skills},
        packs={s: Path(packs[s].path) for s in skills},
        tests={s: read_jsonl(data[s].test.path) for s in (*skills, "general")},
        train={s: read_jsonl(data[s].train.path) for s in (*skills, "general")},
    )


class DeltaEvaluator:
    """Exact-match accuracy of the base with given per-tensor deltas added, in memory (no files)."""

    def __init__(self, tb: Testbed) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        self.tb = tb
        self.model = AutoModelForCausalLM.from_pretrained(tb.base, dtype=torch.float32, use_safetensors=True)
        self.base_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.max_new_tokens = tb.spec.evaluate.max_new_tokens

    def load(self, deltas: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        state = {k: v.clone() for k, v in self.base_state.items()}
        for key, d in (deltas or {}).items():
            state[key] += (d.dense() if isinstance(d, LowRankDelta) else d).to(state[key].dtype).view_as(state[key])
        self.model.load_state_dict(state)
        return self.model

    def accuracy(self, deltas: dict[str, torch.Tensor] | None, skills: list[str]) -> dict[str, float]:
        return self.model_accuracy(self.load(deltas), skills)

    def model_accuracy(self, model, skills: list[str]) -> dict[str, float]:
        return {s: exact_match(model, self.tb.tokenizer, self.tb.tests[s], self.max_new_tokens) for s in skills}


def state_accuracy(ev: DeltaEvaluator, state: dict[str, torch.Tensor], skills: list[str]) -> dict[str, float]:
    """Accuracy of a full state dict (e.g. a fusion's output tensors) loaded into the evaluator's model."""
    ev.model.load_state_dict({k: v.float() for k, v in state.items()})
    return ev.model_accuracy(ev.model, skills)


def fisher_on(model: torch.nn.Module, tokenizer, rows: list[dict[str, str]], batch_size: int = 16,
              max_length: int = 64) -> dict[str, torch.Tensor]:
    """Fisher diagonal of `model` on `rows`, keyed like the model's state dict."""
    from graft.data import labelled_batches
    from graft.importance import SCORES

    return SCORES.get("fisher")(model, labelled_batches(tokenizer, rows, max_length, batch_size)).finalize()


def calibration_batches(tb: Testbed, skill: str, examples: int = 256) -> list[dict[str, torch.Tensor]]:
    """A skill's calibration batches: `examples` of its training rows plus the replayed share of `general`,
    the mix its expert was trained on (as the pipeline's pack stage takes them)."""
    from graft.data import labelled_batches, replay_mix

    rows = replay_mix(tb.train[skill][:examples], tb.train["general"], tb.spec.train.replay_fraction)
    return labelled_batches(tb.tokenizer, rows, tb.spec.train.max_length, 32)
