"""Recipes: named, ordered lists of stages, wired by the artifact types the stages read and write.

A job picks one with `recipe:` (default `graft`), or lists its own stages. A recipe is checked before
anything runs: every stage must exist, and every artifact a stage reads must be written by a stage
before it (`recipe_problem`). `graft recipes` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from graft.registry import Registry
from pipelines.spec import SPEC_SECTIONS, JobSpec, SpecError
from pipelines.stages import STAGES


@dataclass(frozen=True)
class Recipe:
    """A workflow: its stages in order, and what it is for."""

    name: str
    stages: tuple[str, ...]
    description: str

    def modules(self) -> list[ModuleType]:
        return [STAGES[s] for s in self.stages]

    def testbed_skills(self, spec: JobSpec) -> list[str]:
        """The testbed datasets the recipe's stages read beyond the job's skills (a stage's optional `testbed_skills`)."""
        return [s for m in self.modules() if hasattr(m, "testbed_skills") for s in m.testbed_skills(spec)]

    def sections(self) -> set[str]:
        """The job spec sections the recipe's stages read."""
        return {section for m in self.modules() for section in m.SECTIONS}


RECIPES: Registry[Recipe] = Registry("recipe")  # type: ignore[type-var]


def _register(recipe: Recipe) -> None:
    problem = recipe_problem(list(recipe.stages))
    if problem:
        raise ValueError(f"recipe {recipe.name!r}: {problem}")
    RECIPES.register(recipe.name)(recipe)


def recipe_problem(stages: list[str]) -> str | None:
    """Why a list of stage names is not a recipe (an unknown stage, or an artifact read before any stage writes it), or None."""
    if not stages:
        return "a recipe needs at least one stage"
    written: dict[type, str] = {}
    for i, name in enumerate(stages):
        if name not in STAGES:
            return f"unknown stage {name!r}; known: {', '.join(STAGES)}"
        module = STAGES[name]
        for kind in module.READS:
            if kind not in written:
                before = ", ".join(stages[:i]) or "none"
                return f"stage {name!r} reads {kind.__name__}, which no stage before it writes (before it: {before})"
        for kind in module.WRITES:
            written.setdefault(kind, name)
    return None


def recipe_of(choice: str | list[str]) -> Recipe:
    """The recipe a job names (a registered name), or the one it lists (stage names in order); ValueError if neither."""
    if isinstance(choice, str):
        return RECIPES.get(choice) if choice in RECIPES else _unknown(choice)
    problem = recipe_problem(list(choice))
    if problem:
        raise ValueError(problem)
    return Recipe("custom", tuple(choice), "the job's own list of stages")


def _unknown(name: str) -> Recipe:
    raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES.names())}")


def check_job(spec: JobSpec, source: str) -> Recipe:
    """The job's recipe, or SpecError (one line per problem, naming `source`): a recipe that does not exist
    or cannot run, a section the job sets that its recipe never reads, or what a stage of it finds wrong
    across sections (a stage module's optional `problems(spec)`)."""
    try:
        recipe = recipe_of(spec.recipe)
    except ValueError as e:
        raise SpecError([f"{source}: recipe: {e}"]) from None
    used = recipe.sections()
    idle = [s for s in SPEC_SECTIONS if s in spec.model_fields_set and s not in used]
    if idle:
        raise SpecError([f"{source}: {s}: not used by recipe {recipe.name!r} (its stages: {', '.join(recipe.stages)})" for s in idle])
    problems = [f"{source}: {p}" for m in recipe.modules() if hasattr(m, "problems") for p in m.problems(spec)]
    if problems:
        raise SpecError(problems)
    return recipe


def describe(recipe: Recipe) -> str:
    """A recipe's stages, each with what it reads and writes (for `graft recipes`)."""
    lines = [f"{recipe.name}: {recipe.description}"]
    for m in recipe.modules():
        reads = ", ".join(k.__name__ for k in m.READS) or "-"
        writes = ", ".join(k.__name__ for k in m.WRITES)
        lines.append(f"  {m.NAME:<10} reads {reads:<38} writes {writes}")
    return "\n".join(lines)


_register(Recipe("graft", ("testbed", "train", "score", "pack", "graft", "evaluate"),
                 "GraftLLM SkillPacks: a LoRA expert per skill, importance-scored, packed, grafted into the base, evaluated"))
_register(Recipe("transfer", ("testbed", "distill", "train", "score", "pack", "graft", "evaluate"),
                 "GraftLLM cross-model transfer: a source model of another family answers the skill's prompts, the base "
                 "learns from the checked answers (LoRA or full SFT), and its own delta is packed and grafted"))
_register(Recipe("transfer-dpo", ("testbed", "distill", "train", "dpo", "score", "pack", "graft", "evaluate"),
                 "GraftLLM cross-model transfer with its optional DPO step: as `transfer`, then where the trained base still "
                 "answers otherwise than the source, the source's answer is preferred to its own (DPO) before packing"))
_register(Recipe("port", ("testbed", "train", "port", "port_eval"),
                 "PortLLM patch porting: each skill's expert, trained on the base, applied to newer base versions with no training, "
                 "against the new bases alone and (port.reference_finetune) the same expert trained on them"))
_register(Recipe("transplant", ("testbed", "concepts", "transplant"),
                 "ConTrans concept transplantation: a concept vector taken in a small aligned model, mapped into a larger one by "
                 "an affine map between their hidden states, and injected into one of its layers, swept over layer and strength"))
_register(Recipe("merge-study", ("testbed", "train", "score", "pack", "merge", "evolve", "merge_study"),
                 "Domain + language merging: a second language's expert and a domain vocabulary's expert, full fine-tunes of "
                 "one base, merged by linear, task arithmetic, SLERP, TIES, DARE-TIES and an evolved DARE-TIES (Ray Tune), "
                 "against the domain's SkillPack grafted into the language expert; measured on the vocabulary in both languages"))
