"""The job spec: YAML → validated pydantic models → plain arguments for the stages.

Every mistake in a job file is reported as one line that names the file and the key path, e.g.
`jobs/x.yaml: train.lora.rank: expected int, got 'eight'`, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from graft.importance import SCORES
from graft.testbed.skills import SKILLS


class SpecError(ValueError):
    """A job spec that cannot be run; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingSpec(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite under output_dir")
    experiment: str = "graftline"


class TestbedSpec(Strict):
    """The synthetic-skills testbed: a char tokenizer and a tiny model pretrained on `general`."""

    family: Literal["llama", "qwen2", "gpt2"] = "llama"
    size: Literal["tiny", "small", "large"] = "tiny"
    pretrain_examples: int = Field(20000, gt=0)
    pretrain_steps: int = Field(3000, gt=0)
    pretrain_lr: float = Field(1e-2, gt=0)
    batch_size: int = Field(32, gt=0, description="per worker")
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(2, gt=0)
    train_examples: int = Field(4000, gt=0, description="training examples written per skill")
    eval_examples: int = Field(200, gt=0, description="held-out examples written per skill")


class SkillSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    train: Path | None = Field(None, description="JSONL with prompt/answer; default: the testbed skill `name`")
    eval: Path | None = Field(None, description="held-out JSONL; default: the testbed skill `name`")

    @model_validator(mode="after")
    def _source(self) -> "SkillSpec":
        if (self.train is None) != (self.eval is None):
            raise ValueError("give both 'train' and 'eval' files, or neither (testbed skill)")
        if self.train is None and self.name not in SKILLS:
            raise ValueError(f"no testbed skill {self.name!r} (known: {', '.join(SKILLS.names())}); give train/eval files")
        return self


class LoraSpec(Strict):
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TrainSpec(Strict):
    """Adapter training: one Ray Train run per skill, DeepSpeed ZeRO on `num_workers` workers."""

    method: Literal["lora"] = "lora"
    lora: LoraSpec = LoraSpec()
    zero_stage: Literal[0, 1, 2, 3] = 2
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: int = Field(1, gt=0)
    accelerator: Literal["cpu", "cuda"] = "cpu"
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0, description="per worker")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, ge=0)
    bf16: bool = False
    offload_optimizer: bool = False
    max_length: int = Field(64, gt=0)
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged over the generated DeepSpeed config")
    seed: int = 0


class ScoreSpec(Strict):
    """Per-parameter importance of each skill's expert, fanned out as Ray tasks over data shards."""

    method: str = "fisher"
    shards: int = Field(2, gt=0)
    examples: int = Field(256, gt=0)
    batch_size: int = Field(1, gt=0, description="examples per gradient; 1 = per-example Fisher")

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in SCORES:
            raise ValueError(f"unknown importance score {v!r}; known: {', '.join(SCORES.names())}")
        return v


class PackSpec(Strict):
    """SkillPack compression of each skill's delta (methods.md §1)."""

    energy: float = Field(0.95, gt=0, le=1, description="β: fraction of Σσ² the kept rank must hold")
    bits: list[int] = Field([8, 4], description="bits per rank band, leading band first")
    band_fractions: list[float] = Field([0.5, 0.5], description="fraction of the kept rank in each band")
    min_importance_share: float = Field(0.0, ge=0, lt=1, description="leave out tensors with less of the skill's importance mass")

    @model_validator(mode="after")
    def _bands(self) -> "PackSpec":
        if len(self.bits) != len(self.band_fractions):
            raise ValueError("'bits' and 'band_fractions' need the same length")
        if any(b not in (2, 4, 8) for b in self.bits):
            raise ValueError("each of 'bits' must be 2, 4 or 8")
        if abs(sum(self.band_fractions) - 1.0) > 1e-6:
            raise ValueError("'band_fractions' must sum to 1")
        return self


class GraftSpec(Strict):
    scale: float = 1.0


class EvaluateSpec(Strict):
    max_new_tokens: int = Field(12, gt=0)
    batch_size: int = Field(64, gt=0)
    examples: int | None = Field(None, gt=0, description="cap on held-out examples per skill")


class JobSpec(Strict):
    """A whole graftline job: which base, which skills, and how each stage runs."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output_dir: Path = Path("runs")
    base: str = Field("testbed", description="'testbed', a local HF checkpoint folder, or a hub id")
    tokenizer: str | None = Field(None, description="default: the base's own tokenizer")
    trust_remote_code: bool = False
    tracking: TrackingSpec = TrackingSpec()
    testbed: TestbedSpec = TestbedSpec()
    skills: list[SkillSpec] = Field(min_length=1)
    train: TrainSpec = TrainSpec()
    score: ScoreSpec = ScoreSpec()
    pack: PackSpec = PackSpec()
    graft: GraftSpec = GraftSpec()
    evaluate: EvaluateSpec = EvaluateSpec()

    @model_validator(mode="after")
    def _unique_skills(self) -> "JobSpec":
        names = [s.name for s in self.skills]
        if len(set(names)) != len(names):
            raise ValueError(f"skill names must be unique, got {names}")
        return self


_TYPE_NAMES = {"int": "int", "float": "float", "bool": "bool", "string": "str", "list": "list",
               "dict": "mapping", "model": "mapping", "path": "path"}


def _describe(err: dict[str, Any]) -> str:
    kind = err["type"]
    for prefix, name in _TYPE_NAMES.items():
        if kind.startswith(prefix + "_") and kind.endswith(("_type", "_parsing")):
            return f"expected {name}, got {err['input']!r}"
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "missing required key"
    if kind == "literal_error":
        return f"{err['msg'].replace('Input should be', 'expected')}, got {err['input']!r}"
    return err["msg"].removeprefix("Value error, ")


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p not in ("function-after", "function-before"):
            parts.append(("." if parts else "") + str(p))
    return "".join(parts) or "(top level)"


def parse_job(data: Any, source: str) -> JobSpec:
    """Validate an already-parsed YAML document; errors name `source` and the key path."""
    if not isinstance(data, dict):
        raise SpecError([f"{source}: the job spec must be a mapping at the top level"])
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError([f"{source}: {_key_path(err['loc'])}: {_describe(err)}" for err in e.errors()]) from None
    problems = []
    for i, skill in enumerate(spec.skills):
        for key in ("train", "eval"):
            path = getattr(skill, key)
            if path is not None and not path.is_file():
                problems.append(f"{source}: skills[{i}].{key}: no such file {str(path)!r}")
    if spec.base != "testbed" and (spec.base.startswith((".", "/", "~")) or Path(spec.base).exists()):
        if not Path(spec.base).expanduser().is_dir():
            problems.append(f"{source}: base: no such checkpoint folder {spec.base!r}")
    if problems:
        raise SpecError(problems)
    return spec


def load_job(path: str | Path) -> JobSpec:
    """Read and validate a job YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError([f"{path}: cannot read job spec ({e.strerror})"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError([f"{path}: {where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    return parse_job(data, str(path))
