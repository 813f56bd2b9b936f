"""The job spec: YAML → validated pydantic models → plain arguments for the stages.

Every mistake in a job file is reported as one line that names the file and the key path, e.g.
`jobs/x.yaml: train.lora.rank: expected int, got 'eight'`, before anything runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from graft.artifacts import safe_name
from graft.checkpoint import CheckpointError, weight_files
from graft.distill import CHECKERS
from graft.fusion import FUSIONS
from graft.importance import SCORES
from graft.merge.base import MERGE_METHODS
from graft.quantize import QUANTIZERS, VALID_BITS
from graft.skillpack import RANK_VALUES, PackSettings
from graft.sparse import MASK_RULES
from graft.transplant import BEHAVIOURS, VECTORS
from graft.strict_yaml import load_yaml
from graft.testbed.recipes import MAX_VERSIONS, Recipe, model_names, testbed_recipes
from graft.testbed.skills import SKILLS
from pipelines.merge_search import SAMPLERS
from pipelines.sweep_metrics import metric_problem


class SpecError(ValueError):
    """A job spec that cannot be run; `lines` holds one message per problem."""

    def __init__(self, lines: list[str]) -> None:
        super().__init__("\n".join(lines))
        self.lines = lines


MAX_NUMBER = 1e12  # no count, size or rate in a job is larger; `steps: 1e30` is a typo, not a plan


def _sane_numbers(values: Any, where: str = "") -> None:
    if isinstance(values, bool):
        return
    if isinstance(values, (int, float)) and abs(values) > MAX_NUMBER:
        raise ValueError(f"{where or 'value'} {values!r} is beyond any sane setting (|x| ≤ {MAX_NUMBER:g})")
    if isinstance(values, (list, tuple)):
        for v in values:
            _sane_numbers(v, where)


class Strict(BaseModel):
    """A spec section: unknown keys refused, frozen, numbers finite (no .inf/.nan) and within sane bounds."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _bounded(self) -> "Strict":
        for name in type(self).model_fields:
            _sane_numbers(getattr(self, name), name)
        return self


SafeName = Annotated[str, AfterValidator(safe_name)]


class ComputeSpec(Strict):
    """Where every stage's model work runs; `pipelines.placement` turns it into device, dtype, threads and Ray resources.

    On `cuda`, training's workers each take one GPU, and every other model task (scoring, packing, evaluation,
    distillation, transplant extraction, ...) runs in bfloat16 on `gpus_per_task` of a GPU. A fraction lets several
    tasks of a small model share one GPU; `graft plan` shows what each task needs.
    """

    accelerator: Literal["cpu", "cuda"] = "cpu"
    gpus_per_task: float = Field(1.0, gt=0, le=1, description="with accelerator cuda: the GPU share of each model task "
                                 "outside training (below 1: several tasks share a GPU)")
    cpus_per_task: int = Field(1, gt=0, le=256, description="CPU threads of each model task outside training")


class TrackingSpec(Strict):
    """Where MLflow records the job, and whether its grafted checkpoint becomes a registered model version."""

    uri: str | None = Field(None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite under output_dir")
    experiment: str = "graftline"
    register_model: bool = Field(True, description="register the graft stage's checkpoint as a version of an MLflow "
                                 "model (`model_name`), servable with mlflow.pyfunc / `mlflow models serve`")
    model_name: str | None = Field(None, description="the registered model; default: `<job name>-grafted`")
    system_metrics_every_s: float = Field(10.0, ge=0, description="seconds between MLflow system-metrics samples (CPU, "
                                          "memory, GPU) of rank 0's node on each training run; 0: none")

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        from pipelines.logged_model import model_name_problem

        problem = model_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(problem)
        return v


class TestbedSpec(Strict):
    """The synthetic-skills testbed: a char tokenizer, skills, and tiny models trained from scratch."""

    versions: int = Field(3, ge=1, le=MAX_VERSIONS, description="length of the base-version chain base-v1 … base-vN (PortLLM's "
                          "evolving base: each version a continued pretraining of the one before on fresh `general` data)")
    models: list[str] = Field(["base-v1"], description="testbed models to build: base-v1 … base-v<versions>, target-large, "
                              "source-hetero, aligned-small")
    family: Literal["llama", "qwen2", "gpt2"] = "llama"
    size: Literal["tiny", "mini", "small", "large"] = "tiny"
    evolve_steps: int = Field(300, gt=0, description="continued-pretraining steps from one base version to the next")
    evolve_lr: float | None = Field(None, gt=0, description="peak learning rate of each continued pretraining (default "
                                    "pretrain_lr / 3): with evolve_steps, how far each version drifts from the one before")
    align_steps: int = Field(300, gt=0, description="fine-tuning steps that make aligned-small show the concept")
    target_steps: int = Field(700, gt=0, description="pretraining steps of target-large (it learns faster than the base)")
    source_skill: Annotated[str, AfterValidator(SKILLS.check)] = Field("reverse", description="the skill source-hetero is trained on")
    source_family: Literal["llama", "qwen2", "gpt2"] = "qwen2"
    source_steps: int = Field(600, gt=0, description="training steps of source-hetero, from scratch")
    source_replay_fraction: float = Field(0.0, ge=0, lt=1, description="share of source-hetero's batches drawn from `general`")
    pretrain_examples: int = Field(20000, gt=0)
    pretrain_steps: int = Field(900, gt=0)
    pretrain_lr: float = Field(5e-3, gt=0)
    batch_size: int = Field(32, gt=0, description="per worker")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="train.deepspeed applies to the testbed too: its "
                                            "zero_optimization.stage, when set, is the stage that runs")
    num_workers: int = Field(2, gt=0)
    train_examples: int = Field(4000, gt=0, description="training examples written per skill")
    eval_examples: int = Field(200, gt=0, description="held-out examples written per skill")

    @field_validator("models")
    @classmethod
    def _known_models(cls, v: list[str], info: ValidationInfo) -> list[str]:
        versions = info.data.get("versions", 3)
        known = model_names(versions)
        for name in v:
            if name not in known:
                raise ValueError(f"unknown testbed model {name!r}; known with versions={versions}: {', '.join(known)}")
        return v

    def recipes(self, models: list[str], seed: int) -> list[Recipe]:
        """The recipes that make `models`, parents first, with these settings: what the testbed stage builds and what
        `graft plan` sizes, from one place."""
        return testbed_recipes(models, family=self.family, size=self.size, seed=seed, pretrain_examples=self.pretrain_examples,
                               pretrain_steps=self.pretrain_steps, lr=self.pretrain_lr, evolve_steps=self.evolve_steps,
                               evolve_lr=self.evolve_lr, align_steps=self.align_steps, target_steps=self.target_steps,
                               source_skill=self.source_skill, source_family=self.source_family, source_steps=self.source_steps,
                               source_replay_fraction=self.source_replay_fraction, versions=self.versions)


class DistillSpec(Strict):
    """GraftLLM's first step (methods.md §1.1): a source model answers each skill's training prompts, and the
    answers that pass the checker become the data the target (the base) trains on."""

    source: str = Field("testbed:source-hetero", description="testbed:NAME (a model the testbed stage builds, listed in "
                        "testbed.models), or any HF causal LM by local folder or hub id (its own tokenizer)")
    checker: Annotated[str, AfterValidator(CHECKERS.check)] = Field(
        "exact", description="exact: the answer must equal the row's reference answer; nonempty: non-empty, at most "
        "max_chars, one per distinct prompt (for prompts without references)")
    examples: int | None = Field(None, gt=0, description="cap on training prompts answered per skill (default: all)")
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(64, gt=0, description="prompts per generation batch")
    actors: int = Field(2, gt=0, description="Ray Data actors generating in parallel, one source model load each")
    cpus_per_actor: int = Field(1, gt=0)
    max_chars: int = Field(2000, gt=0, description="longest answer the nonempty checker keeps")


class DpoSpec(Strict):
    """GraftLLM's optional DPO step after SFT: where the trained target still answers a distilled prompt otherwise
    than the source did, the source's answer is chosen and the target's rejected; the target's expert is then trained
    on those pairs with the DPO loss (the SFT model is the frozen reference), through the same Ray Train + DeepSpeed
    loop and the `train` section's workers, ZeRO stage and precision."""

    beta: float = Field(0.1, gt=0, description="how far the policy may move from the SFT reference (DPO's β)")
    nll_weight: float = Field(0.0, ge=0, description="weight of the chosen answers' per-token NLL added to the "
                              "DPO loss (RPO; TRL's rpo_alpha): keeps the chosen answer likely while the margin widens "
                              "(0: plain DPO)")
    steps: int = Field(100, gt=0)
    epochs: float | None = Field(3.0, gt=0, description="at most this many passes over a skill's pairs: a skill with few "
                                 "pairs trains fewer than `steps` steps, so DPO does not grind a handful of pairs hundreds "
                                 "of times (None: always `steps`)")
    lr: float = Field(1e-4, gt=0, description="usually 10× below the SFT learning rate")
    batch_size: int = Field(16, gt=0, description="pairs per worker (each pair is two sequences)")
    warmup_steps: int = Field(10, gt=0, description="linear warmup; DeepSpeed's schedule needs at least one step")
    examples: int | None = Field(None, gt=0, description="cap on distilled prompts the target answers per skill (default: all)")
    max_new_tokens: int = Field(32, gt=0, description="of the target's own answers")
    samples: int = Field(4, ge=0, le=64, description="answers sampled per prompt whose greedy answer is already the source's: "
                         "the first that is not becomes the rejected answer (0: greedy errors only)")
    temperature: float = Field(1.0, gt=0, description="of the sampled answers")
    generate_batch_size: int = Field(64, gt=0, description="prompts per generation batch")
    actors: int = Field(2, gt=0, description="Ray Data actors answering in parallel, one target model load each")
    cpus_per_actor: int = Field(1, gt=0)


class PortSpec(Strict):
    """PortLLM (methods.md §2): each skill's patch (its expert, trained on `base`) applied to newer versions of the
    base with no training, and measured against them."""

    to: list[str] = Field(["testbed:base-v2"], min_length=1, description="the new bases: testbed:NAME (a model the "
                          "testbed stage builds, listed in testbed.models), or checkpoint folders / hub ids")
    reference_finetune: bool = Field(False, description="also train the same expert on each new base (the train section's "
                                     "settings) and report ‖Δ' − Δ‖_F / ‖Δ‖_F and the cosine per module")

    @field_validator("to")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each new base once, got {v}")
        return v


class TransplantSpec(Strict):
    """ConTrans (methods.md §5): a concept vector taken in `source` on the concept skill's positive/negative pairs,
    mapped into `target` by an affine map fitted on shared `general` prompts, and added to one target layer's output."""

    source: str = Field("testbed:aligned-small", description="the aligned model: testbed:NAME or a checkpoint folder / hub id")
    target: str = Field("testbed:target-large", description="the model the concept is transplanted into")
    concept: str | None = Field(None, description="the job skill holding the pairs (default: the first skill): rows with "
                                "prompt/answer/negative (positive = prompt + answer) or positive/negative texts")
    general: str = Field("general", description="the shared ordinary prompts (prompt/answer rows): `general` (the testbed's), or "
                         "one of the job's skills. Its training split fits the affine map; its held-out split measures what "
                         "steering costs")
    vector: Annotated[str, AfterValidator(VECTORS.check)] = Field("mean", description="mean of the pair differences, or pca "
                                                                  "(their first principal component)")
    behaviour: Annotated[str, AfterValidator(BEHAVIOURS.check)] = Field("uppercase", description="what shows the concept in a "
                                                                        "completion (and what is stripped before `general` is scored)")
    target_layers: list[int] | None = Field(None, min_length=1, description="target layers swept; default: all")
    source_layer: int | None = Field(None, ge=0, description="source layer of the vector; default: each target layer's "
                                     "relative depth in the source")
    alphas: list[float] = Field([0.0, 1.0, 2.0, 5.0], min_length=1, description="injection strengths swept")
    pairs: int = Field(200, gt=1, description="positive/negative pairs the vector is taken on")
    prompts: int = Field(2000, gt=4, description="shared `general` prompts the affine map is fitted on (80%) and checked on (20%)")
    map_on_pairs: bool = Field(True, description="fit the affine map on the concept pairs' texts too, beside the shared "
                               "prompts (shuffled together before the 80/20 split): ordinary prompts alone never show the "
                               "concept, so the map learns nothing about its direction")
    examples: int = Field(100, gt=0, description="held-out prompts each sweep point is scored on")
    shards: int = Field(2, gt=0, le=64, description="Ray tasks per model for hidden-state extraction")
    max_general_drop: float = Field(0.05, ge=0, le=1, description="the chosen point may cost `general` at most this much")
    seed: int = Field(0, description="seed of the random-direction control")

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"each alpha once, got {v}")
        return v


class SkillSpec(Strict):
    name: SafeName = Field(description="names output folders and the router's classes: letters, digits, _ - ., not 'none'")
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


class SparseSpec(Strict):
    """Sparse adapters (`train.method: sparse`, methods.md §3): PEFT SHiRA deltas on the target modules, their
    entries chosen before training by `rule` and kept fixed (`graft.sparse`)."""

    rule: Annotated[str, AfterValidator(MASK_RULES.check)] = Field("snip", description="what picks the trained entries: "
                                                                    "random, magnitude (|θ|) or snip (|g ⊙ θ| on the skill's batches)")
    keep_fraction: float = Field(0.1, gt=0, le=1, description="share of the target modules' weights trained; SHiRA sizes every "
                                 "module by one r, so the kept count is the nearest r·Σ(m + n) to this share of Σ m·n")
    match_lora_rank: int | None = Field(None, gt=0, description="instead of keep_fraction: as many trainable entries as a LoRA of "
                                        "this rank on the same modules (SHiRA's r), a full-rank adapter at LoRA's size (\"large-sparse\")")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1)
    score_batches: int = Field(4, gt=0, le=1000, description="batches of the skill's training rows `snip` scores on")


class TrainSpec(Strict):
    """Expert training: one Ray Train run for all skills, DeepSpeed ZeRO on `num_workers` workers."""

    method: Literal["lora", "full", "sparse"] = Field("lora", description="lora: a PEFT LoRA adapter per skill; full: full "
                                                      "fine-tuning (GraftLLM's SFT; the SkillPack then compresses the dense delta; "
                                                      "usually wants a smaller `lr`); sparse: a sparse adapter (`train.sparse`)")
    lora: LoraSpec = LoraSpec()
    sparse: SparseSpec = SparseSpec()
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="a `deepspeed` override's zero_optimization.stage, when set, "
                                            "is the stage that runs (and what MLflow records as deepspeed.zero_stage)")
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: int = Field(1, gt=0)
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0, description="per worker")
    lr: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(20, gt=0, description="linear warmup; DeepSpeed's schedule needs at least one step")
    bf16: bool = False
    offload_optimizer: bool = False
    max_length: int = Field(64, gt=0)
    replay_fraction: float = Field(0.0, ge=0, lt=1, description="share of each batch drawn from `replay_data`, to keep general ability")
    replay_data: str = Field("general", description="a testbed skill name or a JSONL file replayed during skill training")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="merged over the generated DeepSpeed config; "
                                      "or the path of a JSON/YAML file holding it, e.g. cluster/deepspeed/zero3-bf16.json")
    seed: int = 0
    checkpoint_every: int = Field(100, gt=0, le=1_000_000, description="steps between training checkpoints in Ray Train "
                                  "storage, from which a failed worker group resumes (the testbed's trainings too)")
    max_failures: int = Field(2, ge=0, le=100, description="worker-group failures (a killed worker, a lost node) a training "
                              "run recovers from, each time from its last checkpoint, before the stage fails")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "accelerator" in data:
            raise ValueError("accelerator: moved to compute.accelerator (it places every stage, not only training)")
        return data

    @field_validator("deepspeed", mode="before")
    @classmethod
    def _deepspeed_file(cls, v: Any) -> Any:
        """Read a named overrides file now, so the stages' content keys cover what it holds."""
        if not isinstance(v, str):
            return v
        try:
            data = load_yaml(Path(v).expanduser().read_text())  # JSON is YAML too; a repeated key is refused
        except OSError as e:
            raise ValueError(f"cannot read DeepSpeed config file {v!r} ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"DeepSpeed config file {v!r} is not valid JSON/YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(data, dict):
            raise ValueError(f"DeepSpeed config file {v!r} must hold a mapping")  # noqa: TRY004 - pydantic reports ValueError
        return data

    @field_validator("deepspeed")
    @classmethod
    def _deepspeed_mergeable(cls, v: dict[str, Any]) -> dict[str, Any]:
        from pipelines.training.deepspeed_config import override_problem

        problem = override_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class ScoreSpec(Strict):
    """Per-parameter importance of each skill's expert, fanned out as Ray tasks over data shards."""

    method: Annotated[str, AfterValidator(SCORES.check)] = "fisher"
    shards: int = Field(2, gt=0)
    examples: int = Field(256, gt=0)
    batch_size: int = Field(1, gt=0, description="examples per gradient; 1 = per-example Fisher")


class PackSpec(Strict):
    """SkillPack compression of each skill's delta (methods.md §1)."""

    energy: float = Field(0.99, gt=0, le=1, description="β: fraction of each matrix's Σσ² its kept rank must hold (unless `budget`)")
    budget: float | None = Field(None, gt=0, le=1, description="at most this fraction of the bf16 delta's bytes; "
                                 "ranks go where they hold the most σ² per byte, across all matrices (replaces `energy`)")
    allocation: Annotated[str, AfterValidator(RANK_VALUES.check)] = Field(
        "energy", description="with `budget`: what a direction is worth: energy (σ²), importance (Fisher-weighted), energy_importance")
    keep_fraction: float = Field(0.1, gt=0, le=1, description="α: fraction of each embedding / LM head delta's entries kept "
                                 "(largest magnitude first); a full fine-tune's delta holds them, a LoRA's usually not")
    bits: list[int] = Field([8, 4], description="bits per rank band, leading band first")
    band_fractions: list[float] = Field([0.5, 0.5], description="fraction of the kept rank in each band")
    quantizer: Annotated[str, AfterValidator(QUANTIZERS.check)] = Field(
        "rtn", description="rtn: round to nearest; gptq: round against the layer's inputs on the skill's data (runs calibration)")
    weighted_svd: bool = Field(False, description="SVD weighted by each input channel's RMS on the skill's data (runs calibration)")
    tune_steps: int = Field(0, ge=0, description="passes of grid tuning after packing: each column's grid fitted so base + pack "
                            "matches the expert's answers (KL) on the calibration rows; same bytes (runs calibration)")
    tune_lr: float = Field(0.003, gt=0, description="Adam learning rate of grid tuning")
    min_importance_share: float = Field(0.0, ge=0, lt=1, description="leave out tensors with less of the skill's importance mass")
    calibration_examples: int = Field(256, gt=0, description="skill training examples calibration runs on (plus the "
                                      "train.replay_fraction share of replay data, the mix the expert was trained on)")
    sign_key: Path | None = Field(None, description="sign each SkillPack with this private key (PEM; `graft keygen` makes a pair)")

    @model_validator(mode="after")
    def _bands(self) -> "PackSpec":
        if len(self.bits) != len(self.band_fractions):
            raise ValueError("'bits' and 'band_fractions' need the same length")
        if any(b not in VALID_BITS for b in self.bits):
            raise ValueError(f"each of 'bits' must be one of {list(VALID_BITS)}")
        if abs(sum(self.band_fractions) - 1.0) > 1e-6:
            raise ValueError("'band_fractions' must sum to 1")
        return self

    def settings(self) -> PackSettings:
        """The library's settings for these keys."""
        return PackSettings(energy=self.energy, bits=tuple(self.bits), band_fractions=tuple(self.band_fractions), budget=self.budget,
                            keep_fraction=self.keep_fraction,
                            quantizer=self.quantizer, weighted_svd=self.weighted_svd, allocation=self.allocation)

    @property
    def calibrate(self) -> bool:
        """Whether packing needs the skill's data run through the expert (input moments or grid tuning)."""
        return self.settings().needs_calibration or self.tune_steps > 0


class GraftSpec(Strict):
    """How the driver fuses the SkillPacks into the base (graft.fusion.FUSIONS)."""

    method: Annotated[str, AfterValidator(FUSIONS.check)] = "additive"
    scale: float = 1.0
    protect_fraction: float = Field(0.2, ge=0, lt=1, description="'protected': share of each tensor shielded for earlier skills")
    router_examples: int = Field(400, gt=0, description="'routed': training prompts per skill (and for 'none') for the router")
    router_none: str = Field("general", description="'routed': prompts that must stay on the base — a testbed skill or a JSONL file")
    require_signature: Path | None = Field(None, description="public key (PEM): graft only SkillPacks signed by its owner")

    @field_validator("router_none")
    @classmethod
    def _router_none(cls, v: str) -> str:
        if v not in SKILLS and not Path(v).expanduser().is_file():
            raise ValueError(f"{v!r} is neither a testbed skill ({', '.join(SKILLS.names())}) nor a JSONL file")
        return v


class StudyMerge(Strict):
    """One merge of the study: a graft.merge method and its mergekit parameters, for the two experts."""

    method: Annotated[str, AfterValidator(MERGE_METHODS.check)]
    name: SafeName | None = Field(None, description="the row's name (default: the method's)")
    base: Literal["base", "language"] = Field("base", description="mergekit's base_model: the experts' shared base (deltas "
                                              "are taken against it), or the language expert (slerp's t = 0 end)")
    parameters: dict[str, Any] = Field(default_factory=dict, description="mergekit `parameters:` for the whole merge (slerp's t)")
    language: dict[str, Any] = Field(default_factory=dict, description="the language expert's own parameters (weight, density)")
    domain: dict[str, Any] = Field(default_factory=dict, description="the domain expert's own parameters (weight, density)")


def _default_merges() -> list[StudyMerge]:
    both = {"weight": 1.0, "density": 0.5}
    return [StudyMerge(method="linear", language={"weight": 0.5}, domain={"weight": 0.5}),
            StudyMerge(method="task_arithmetic", language={"weight": 1.0}, domain={"weight": 1.0}),
            StudyMerge(method="slerp", base="language", parameters={"t": 0.5}),
            StudyMerge(method="ties", language=dict(both), domain=dict(both)),
            StudyMerge(method="dare_ties", language=dict(both), domain=dict(both))]


class EvolveSpec(Strict):
    """Evolutionary DARE-TIES (methods.md §4): a Ray Tune search over each expert's weight and density, each trial
    merged and scored on the dev rows; the best config is written out and measured like the others."""

    trials: int = Field(24, ge=0, le=10_000, description="Tune trials; 0 skips the search")
    search: Annotated[str, AfterValidator(SAMPLERS.check)] = Field("cmaes", description="the Optuna sampler behind Tune's "
                                                                   "OptunaSearch: cmaes (an evolution strategy), tpe or random")
    weight: tuple[float, float] = Field((0.0, 1.5), description="range of each expert's weight")
    density: tuple[float, float] = Field((0.1, 1.0), description="range of each expert's density")
    max_concurrent: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _ranges(self) -> "EvolveSpec":
        for key in ("weight", "density"):
            lo, hi = getattr(self, key)
            if not lo < hi or lo < 0 or (key == "density" and (lo <= 0 or hi > 1)):
                raise ValueError(f"{key}: expected lo < hi within {'(0, 1]' if key == 'density' else '[0, ∞)'}, got [{lo}, {hi}]")
        return self


class MergeStudySpec(Strict):
    """The domain + language merge study (methods.md §4): the expert of `language` (a second language's general
    data) and the expert of `domain` (a vocabulary in the first language), both trained from the base, merged
    by each of `merges` and by an evolved DARE-TIES, against the domain's SkillPack grafted into the language
    expert; every model is measured on the vocabulary in both languages and on general data."""

    language: str = Field("general_ja", description="the job skill whose expert is the language model")
    domain: str = Field("vocab", description="the job skill whose expert holds the vocabulary (and whose SkillPack is grafted)")
    domain_lang2: str = Field("vocab_ja", description="the vocabulary asked in the second language: a testbed skill or one of "
                              "the job's skills; measured only, never trained on")
    general: str = Field("general", description="general data in the first language: a testbed skill or one of the job's skills")
    merges: list[StudyMerge] = Field(default_factory=_default_merges)
    evolve: EvolveSpec = EvolveSpec()
    grafts: list[Annotated[str, AfterValidator(FUSIONS.check)]] = Field(["additive", "routed"], description="fusion methods "
                                                                         "that graft the domain's SkillPack into the language expert")
    dev_examples: int = Field(100, gt=0, description="rows of each measured skill's training split that score the evolution's "
                              "trials (disjoint from the held-out rows every model is measured on)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the merged checkpoints' dtype")

    @field_validator("merges")
    @classmethod
    def _unique_rows(cls, v: list[StudyMerge]) -> list[StudyMerge]:
        names = [m.name or m.method for m in v]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two merges are named {repeated[0]!r}: give one a `name`")
        return v

    def rows(self) -> dict[str, StudyMerge]:
        """The static merges by row name."""
        return {m.name or m.method: m for m in self.merges}


class EvaluateSpec(Strict):
    max_new_tokens: int = Field(12, gt=0)
    batch_size: int = Field(64, gt=0)
    examples: int | None = Field(None, gt=0, description="cap on held-out examples per skill (and per lm-eval task)")
    harness: list[str] = Field(default_factory=list, description="lm-evaluation-harness tasks run on the base, each expert "
                               "and the grafted model: built-in task names, task YAML files (*.yaml) or folders of them")
    general: str | None = Field(None, description="what retained general ability is measured on: a testbed skill, a JSONL "
                                "file of {prompt, answer} rows, or an lm-eval task (name or YAML). Default: the testbed's "
                                "`general` on a testbed base; else the held-out part of `train.replay_data` when a file; "
                                "else `graft.router_none` (a file, or a testbed skill)")
    max_general_drop: float = Field(5.0, ge=0, le=100, description="points of general ability a model may lose against "
                                    "the base before the job is marked with a warning")


def _finite(values: Any) -> list[Any]:
    if not isinstance(values, list) or not values:
        raise ValueError("expected a non-empty list of values")
    return values


def _bounds(values: Any) -> list[Any]:
    if (not isinstance(values, list) or len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                       for v in values) or values[0] >= values[1]):
        raise ValueError(f"expected [low, high] with low < high, got {values!r}")
    return values


def _log_bounds(values: Any) -> list[Any]:
    if _bounds(values)[0] <= 0:
        raise ValueError(f"expected [low, high] with 0 < low < high, got {values!r}")
    return values


# search-space kind → its shape check, returning the values to try against the field (pipelines.sweep maps
# the same names onto ray.tune); continuous kinds need a float field.
SEARCH_SPACES: dict[str, Any] = {"choice": _finite, "grid": _finite, "uniform": _bounds, "loguniform": _log_bounds}
CONTINUOUS_SPACES = ("uniform", "loguniform")
# the sections a trial re-runs; the rest (base, testbed, skills, ...) is built once per sweep on the driver
SWEEPABLE = ("train", "score", "pack", "graft", "evaluate")


class SweepSpec(Strict):
    """`graft sweep`: a Ray Tune search over the train → evaluate stages on one shared testbed/base.

    Each key of `params` is a dotted job field inside a sweepable section (e.g. `train.lora.rank`,
    `pack.energy`, `train.deepspeed.zero_optimization.stage`), each value one search space:
    `{choice: [...]}`, `{grid: [...]}`, `{uniform: [lo, hi]}` or `{loguniform: [lo, hi]}`. Grid values are
    all tried, `num_samples` times over (Tune's rule); the other kinds are sampled once per sample.
    """

    metric: str = Field("mean_grafted", description="acc.<model>.<skill>, or an aggregate (pipelines.sweep_metrics.AGGREGATES)")
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(1, gt=0)
    max_concurrent: int | None = Field(None, gt=0, description="default: cluster CPUs // (train.num_workers × cpus_per_worker)")
    scheduler: Literal["asha", "none"] = Field("asha", description="asha: trials report after each rung of skills and "
                                               "the worst are stopped early (see pipelines.sweep)")
    grace_period: int = Field(1, gt=0, description="ASHA: rungs every trial completes before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1/reduction_factor of trials go on at each rung")
    params: dict[str, dict[str, Any]] = Field(min_length=1)

    @field_validator("params")
    @classmethod
    def _spaces(cls, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        problems = []
        for path, space in params.items():
            problem = _field_problem(path) or _space_problem(space)
            if problem:
                problems.append(InitErrorDetails(type=PydanticCustomError("sweep_param", problem), loc=(path,), input=space))
        if problems:
            raise ValidationError.from_exception_data("SweepSpec", problems)
        return params


def _space_problem(space: dict[str, Any]) -> str | None:
    if len(space) != 1 or next(iter(space)) not in SEARCH_SPACES:
        return f"expected one search space of: {', '.join(SEARCH_SPACES)}; got keys {sorted(space)}"
    kind, values = next(iter(space.items()))
    try:
        SEARCH_SPACES[kind](values)
    except ValueError as e:
        return f"{kind}: {e}"
    return None


def _field_annotation(path: str) -> Any:
    """The annotation of the job field at a dotted path (Any inside a free-form mapping), or KeyError."""
    model: Any = JobSpec
    for part in path.split("."):
        if isinstance(model, type) and issubclass(model, BaseModel):
            if part not in model.model_fields:
                raise KeyError(path)
            model = model.model_fields[part].annotation
        elif getattr(model, "__origin__", None) is dict or model is Any:
            model = Any
        else:
            raise KeyError(path)
    return model


def _field_problem(path: str) -> str | None:
    try:
        _field_annotation(path)
    except KeyError:
        return "no such job field"
    if path.split(".")[0] not in SWEEPABLE:
        return (f"cannot be swept: the base, testbed and skills are built once per sweep; sweepable sections: "
                f"{', '.join(SWEEPABLE)}")
    return None


def _with_value(data: dict[str, Any], parts: list[str], value: Any) -> dict[str, Any]:
    """A copy of nested mapping `data` with the dotted path `parts` set to `value`."""
    head, *rest = parts
    return {**data, head: _with_value(dict(data.get(head) or {}), rest, value) if rest else value}


def _sweep_fits_job(sweep: SweepSpec | None, info: ValidationInfo) -> SweepSpec | None:
    """Checks needing the rest of the job: the metric names its skills, every swept value is valid for its field."""
    if sweep is None:
        return None
    problems = []
    if "skills" in info.data:
        problem = metric_problem(sweep.metric, [s.name for s in info.data["skills"]], info.data.get("base") == "testbed")
        if problem:
            problems.append(InitErrorDetails(type=PydanticCustomError("sweep_metric", problem), loc=("metric",), input=sweep.metric))
    for path, space in sweep.params.items():
        section, *parts = path.split(".")
        (kind, values), = space.items()
        if kind in CONTINUOUS_SPACES and _field_annotation(path) not in (float, Any):
            problem = f"{kind} needs a float field; use choice or grid"
        elif section in info.data:
            model = info.data[section]
            problem = None
            for value in SEARCH_SPACES[kind](values):
                try:
                    type(model).model_validate(_with_value(model.model_dump(), parts, value) if parts else value)
                except ValidationError as e:
                    err = e.errors()[0]
                    problem = f"{kind} value {value!r}: {_key_path((section, *err['loc']))}: {_describe(err)}"
                    break
        else:
            continue
        if problem:
            problems.append(InitErrorDetails(type=PydanticCustomError("sweep_param", problem), loc=("params", path), input=space))
    if problems:
        raise ValidationError.from_exception_data("SweepSpec", problems)
    return sweep


class JobSpec(Strict):
    """A whole graftline job: which base, which skills, which recipe of stages, and how each stage runs.

    The sections after `skills` each belong to the stages that read them (a stage's `SECTIONS`); a job
    may set only the sections its recipe uses (`pipelines.recipes.check_job`).
    """

    name: SafeName = Field(description="the run's folder under output_dir: letters, digits, _ - .")
    recipe: str | list[str] = Field("graft", description="a recipe name (`graft recipes` lists them) or a list of stage names")
    seed: int = 0
    output_dir: Path = Path("runs")
    base: str = Field("testbed", description="'testbed', a local HF checkpoint folder, or a hub id")
    tokenizer: str | None = Field(None, description="default: the base's own tokenizer")
    trust_remote_code: bool = False
    compute: ComputeSpec = ComputeSpec()
    tracking: TrackingSpec = TrackingSpec()
    testbed: TestbedSpec = TestbedSpec()
    skills: list[SkillSpec] = Field(min_length=1)
    distill: DistillSpec = DistillSpec()
    dpo: DpoSpec = DpoSpec()
    port: PortSpec = PortSpec()
    transplant: TransplantSpec = TransplantSpec()
    merge_study: MergeStudySpec = MergeStudySpec()
    train: TrainSpec = TrainSpec()
    score: ScoreSpec = ScoreSpec()
    pack: PackSpec = PackSpec()
    graft: GraftSpec = GraftSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    sweep: Annotated[SweepSpec | None, AfterValidator(_sweep_fits_job)] = Field(None, description="for `graft sweep` only")

    @model_validator(mode="after")
    def _replay_source(self) -> "JobSpec":
        rd = self.train.replay_data
        if self.train.replay_fraction > 0 and rd not in SKILLS and not Path(rd).is_file():
            raise ValueError(f"train.replay_data: {rd!r} is neither a testbed skill nor a file")
        return self

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


# fields every recipe reads; the other sections belong to the stages that declare them (SECTIONS)
COMMON_FIELDS = ("name", "recipe", "seed", "output_dir", "base", "tokenizer", "trust_remote_code", "compute", "tracking", "skills")
SPEC_SECTIONS = tuple(f for f in JobSpec.model_fields if f not in COMMON_FIELDS and f != "sweep")


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
        else:
            try:
                weight_files(Path(spec.base).expanduser())  # safetensors only: a folder of pickles is refused here
            except CheckpointError as e:
                problems.append(f"{source}: base: {e}")
    for key, path in (("graft.require_signature", spec.graft.require_signature), ("pack.sign_key", spec.pack.sign_key)):
        if path is not None and not path.expanduser().is_file():
            problems.append(f"{source}: {key}: no such key file {str(path)!r}")
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
        data = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise SpecError([f"{path}: {where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
    return parse_job(data, str(path))
