"""The typed artifacts stages hand each other: what a stage reads and writes, never a dict of strings.

Each artifact is a small frozen dataclass of `pipelines.cache.Ref`s (where a thing is, and its
content key). A stage declares the artifact types it reads and writes (`READS`, `WRITES`); the driver
keeps one `Board` per job, wires stages by type, and a recipe whose stage reads a type no earlier stage
writes is refused before anything runs (`pipelines.recipes.check_recipe`). A request that holds an
artifact hashes it by its Refs' keys, so an artifact's identity is its content, not its location.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from graft.experts import Expert
from pipelines.cache import Ref


class MissingArtifact(KeyError):
    """A stage asked the board for an artifact no earlier stage wrote."""


@dataclass(frozen=True)
class Checkpoint:
    """A causal LM folder and the tokenizer that goes with it."""

    model: Ref
    tokenizer: Ref


@dataclass(frozen=True)
class Base(Checkpoint):
    """The model a job trains adapters on, packs skills against and grafts them into."""


@dataclass(frozen=True)
class Models:
    """Other checkpoints the job's inputs stage built or named, by name (the testbed's base-v2, source-hetero, ...)."""

    by_name: Mapping[str, Checkpoint]

    def __getitem__(self, name: str) -> Checkpoint:
        if name not in self.by_name:
            raise MissingArtifact(f"no model {name!r}; the job has {', '.join(sorted(self.by_name)) or 'none'}")
        return self.by_name[name]


@dataclass(frozen=True)
class Split:
    """One prompt/answer dataset: its training and held-out JSONL files."""

    train: Ref
    test: Ref


@dataclass(frozen=True)
class Datasets:
    """Every dataset of the job by name: its skills', and the others stages use (`general`, replay, router prompts)."""

    by_name: Mapping[str, Split]

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __getitem__(self, name: str) -> Split:
        if name not in self.by_name:
            raise MissingArtifact(f"no dataset {name!r}; the job has {', '.join(sorted(self.by_name))}")
        return self.by_name[name]


@dataclass(frozen=True)
class PerSkill:
    """One output folder per skill (`Ref` by skill name)."""

    by_skill: Mapping[str, Ref]

    def __getitem__(self, skill: str) -> Ref:
        if skill not in self.by_skill:
            raise MissingArtifact(f"no {type(self).__name__.lower()} for skill {skill!r}")
        return self.by_skill[skill]


@dataclass(frozen=True)
class Experts(PerSkill):
    """An expert folder per skill, trained from the `Base`: PEFT adapters, or fine-tuned checkpoints (`kind`,
    a `graft.experts.EXPERT_KINDS` name, the same for every skill of a job)."""

    kind: str = "lora"

    def expert(self, skill: str) -> Expert:
        return Expert(Path(self[skill].path), self.kind)


@dataclass(frozen=True)
class Scores(PerSkill):
    """A folder per skill holding `scores.safetensors` (per-parameter importance) and `summary.json`."""


@dataclass(frozen=True)
class Packs(PerSkill):
    """A SkillPack folder per skill."""


@dataclass(frozen=True)
class Ported:
    """A port folder per skill and new base (`port.json`: the patch's fit and the base's drift under it; with a
    reference fine-tune, its adapter and the update gap), and the new bases by name."""

    by_pair: Mapping[str, Ref]  # "<skill>@<new base name>"
    bases: Mapping[str, Checkpoint]
    references: Mapping[str, Ref]  # the reference fine-tunes, by the same pair names; empty without them

    @staticmethod
    def pair(skill: str, base: str) -> str:
        return f"{skill}@{base}"


@dataclass(frozen=True)
class Concepts:
    """What a concept transplant is fitted from (`concepts.safetensors`): the source's concept vector at every layer,
    and both models' last-token states on the shared prompts; with the two models it was taken from."""

    folder: Ref
    source: Checkpoint
    target: Checkpoint


@dataclass(frozen=True)
class Transplanted:
    """The chosen concept transplant (a `graft.transplant.Transplant` folder) and the target it applies to."""

    folder: Ref
    target: Checkpoint


@dataclass(frozen=True)
class Merged:
    """Merged checkpoints by name (the merge study's `linear`, `ties`, ..., `evolved_dare_ties`), each with the
    mergekit-style config that made it (`merge.yaml` in its folder)."""

    by_name: Mapping[str, Checkpoint]


@dataclass(frozen=True)
class Grafted:
    """The base with the job's packs in it: a checkpoint folder, or a routed-model folder."""

    model: Ref


@dataclass(frozen=True)
class Report:
    """The evaluation report folder (`eval.json`, `eval.txt`, `eval.png`) and its table {model: {skill: accuracy}}."""

    folder: Ref
    table: Mapping[str, Mapping[str, float]]


A = TypeVar("A")


class Board:
    """The artifacts of one job so far, one of each type; stages read by type and the driver adds what they write."""

    def __init__(self, artifacts: Iterable[object] = ()) -> None:
        self._by_type: dict[type, object] = {}
        self.put(*artifacts)

    def put(self, *artifacts: object) -> None:
        for artifact in artifacts:
            self._by_type[type(artifact)] = artifact

    def get(self, kind: type[A]) -> A:
        if kind not in self._by_type:
            raise MissingArtifact(f"no {kind.__name__} artifact: no stage before this one writes it")
        return self._by_type[kind]  # type: ignore[return-value]

    def has(self, kind: type) -> bool:
        return kind in self._by_type

    def types(self) -> list[type]:
        return list(self._by_type)
