"""What a sweep can optimise: names → one number from the evaluate stage's {model: {skill: accuracy}} table.

Two kinds of name (checked when the job spec is validated, so a typo fails before anything runs):
- `acc.<model>.<skill>`: one cell of the table; `<model>` is `base`, `grafted` or `expert-<skill>`,
  `<skill>` one of the job's skills, or `general` when the base is the testbed;
- an aggregate from `AGGREGATES` over the job's own skills (never `general`), e.g. `mean_grafted`.

Pure functions, no Ray or MLflow: the spec imports the names, the sweep driver computes the values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from graft.registry import Registry

Table = dict[str, dict[str, float]]
AGGREGATES: Registry[Callable[[Table, Sequence[str]], float]] = Registry("sweep metric")


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@AGGREGATES.register("mean_grafted")
def mean_grafted(table: Table, skills: Sequence[str]) -> float:
    """Mean grafted-model accuracy over the skills: what grafting them all together delivers."""
    return _mean([table["grafted"][s] for s in skills])


@AGGREGATES.register("min_grafted")
def min_grafted(table: Table, skills: Sequence[str]) -> float:
    """The grafted model's worst skill: a sweep that must not sacrifice any one skill."""
    return min(table["grafted"][s] for s in skills)


@AGGREGATES.register("mean_expert")
def mean_expert(table: Table, skills: Sequence[str]) -> float:
    """Mean accuracy of each skill's own expert (base + its adapter): the training quality alone."""
    return _mean([table[f"expert-{s}"][s] for s in skills])


@AGGREGATES.register("graft_retention")
def graft_retention(table: Table, skills: Sequence[str]) -> float:
    """Mean grafted accuracy / mean expert accuracy: how much of the experts' skill survives grafting (0 if none learnt)."""
    expert = mean_expert(table, skills)
    return mean_grafted(table, skills) / expert if expert > 0 else 0.0


def metric_problem(name: str, skills: Sequence[str], has_general: bool) -> str | None:
    """Why `name` is not a metric of a job with these skills, or None when it is."""
    known = f"use acc.<base|grafted|expert-SKILL>.<SKILL> or one of: {', '.join(AGGREGATES.names())}"
    if name in AGGREGATES:
        return None
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "acc":
        return f"unknown sweep metric {name!r}; {known}"
    model, skill = parts[1], parts[2]
    evaluated = [*skills, *(["general"] if has_general else [])]
    if skill not in evaluated:
        return f"metric {name!r}: {skill!r} is not evaluated by this job (skills: {', '.join(evaluated)})"
    models = ["base", "grafted", *(f"expert-{s}" for s in skills)]
    if model not in models:
        return f"metric {name!r}: no model {model!r} (models: {', '.join(models)})"
    return None


def metric_value(name: str, table: Table, skills: Sequence[str]) -> float:
    """The metric's value in an evaluate table of a job (or rung) with these skills."""
    if name in AGGREGATES:
        return float(AGGREGATES.get(name)(table, skills))
    _, model, skill = name.split(".")
    return float(table[model][skill])


def metric_needs(name: str) -> list[str]:
    """The skills a per-cell metric names (its skill, and its expert's), so the sweep's rungs can put them first."""
    if name in AGGREGATES:
        return []
    _, model, skill = name.split(".")
    return list(dict.fromkeys([skill, *([model.removeprefix("expert-")] if model.startswith("expert-") else [])]))
