"""GraftLLM's first step (methods.md §1.1): the target learns a skill from a source model's answers.

A source causal LM — of any family or size — answers the skill's training prompts by batched greedy
generation (`graft.evaluation.generate_answers`). Each answer goes through a checker, one unit
registered by name in `CHECKERS`, and the answers that pass become the target's training rows
(`{"prompt", "answer"}` with the source's answer). The SkillPack is later made from the *target's*
delta after training on them (methods.md §1.2), not from the source's weights.

- `exact`: keep an answer equal to the row's reference `answer` (testbed skills; a user JSONL with references);
- `nonempty`: keep a non-empty answer of at most `max_chars` characters, the first per distinct prompt
  (for prompts without references).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from graft.artifacts import ArtifactError
from graft.registry import Registry


class DistillError(ArtifactError):
    """A source that cannot answer, or answers that leave nothing to learn from; the message names which."""


@dataclass(frozen=True)
class CheckerLimits:
    """Settings the checkers share."""

    max_chars: int = 2000


Checker = Callable[[list[dict], list[str], CheckerLimits], list[bool]]
CHECKERS: Registry[Checker] = Registry("answer checker")  # type: ignore[type-var]


@CHECKERS.register("exact")
def _exact(rows: list[dict], answers: list[str], limits: CheckerLimits) -> list[bool]:
    for i, row in enumerate(rows):
        if not isinstance(row.get("answer"), str):
            raise DistillError(f"checker 'exact' needs a reference 'answer' in every row; row {i} has none")
    return [a == r["answer"] for r, a in zip(rows, answers)]


@CHECKERS.register("nonempty")
def _nonempty(rows: list[dict], answers: list[str], limits: CheckerLimits) -> list[bool]:
    seen: set[str] = set()
    keep = []
    for row, answer in zip(rows, answers):
        ok = bool(answer.strip()) and len(answer) <= limits.max_chars and row["prompt"] not in seen
        if ok:
            seen.add(row["prompt"])
        keep.append(ok)
    return keep


def check_can_generate(tokenizer, source: str) -> None:
    """DistillError unless the source's tokenizer can end an answer (an eos token; it also pads when there is no pad token)."""
    if tokenizer.eos_token_id is None:
        raise DistillError(f"{source}: the tokenizer has no eos token, so generation cannot end an answer; "
                           "set eos_token in its tokenizer_config.json")


@dataclass(frozen=True)
class Distilled:
    """The rows the target trains on, and how many of the source's answers were kept and dropped, and why."""

    rows: list[dict[str, str]]
    keep: list[bool]  # per prompt, in order: whether its answer was kept
    prompts: int
    kept: int
    empty: int
    rejected: int  # non-empty answers the checker refused

    def stats(self) -> dict[str, float]:
        return {"prompts": self.prompts, "kept": self.kept, "dropped": self.prompts - self.kept, "empty": self.empty,
                "rejected": self.rejected, "kept_fraction": self.kept / self.prompts}


def filter_answers(rows: list[dict], answers: list[str], checker: str, limits: CheckerLimits = CheckerLimits(),
                   source: str = "the source") -> Distilled:
    """The rows whose source answers pass `checker`, with the source's answer as each row's `answer`.

    DistillError when the source answered nothing at all (every answer empty) or when no answer passed:
    training on an empty set would succeed and teach nothing.
    """
    if len(rows) != len(answers):
        raise ValueError(f"{len(rows)} prompts but {len(answers)} answers")
    if not rows:
        raise DistillError("no prompts to distill")
    keep = CHECKERS.get(checker)(rows, answers, limits)
    empty = sum(not a.strip() for a in answers)
    if empty == len(answers):
        raise DistillError(f"{source}: every one of {len(answers)} answers is empty; the model does not generate for these "
                           "prompts (check its eos/chat settings and that it is a causal LM trained on this format)")
    kept = [{"prompt": r["prompt"], "answer": a} for r, a, k in zip(rows, answers, keep) if k]
    if not kept:
        raise DistillError(f"{source}: none of {len(answers)} answers passed checker {checker!r}; "
                           "the source does not have this skill")
    rejected = sum(bool(a.strip()) and not k for a, k in zip(answers, keep))
    return Distilled(kept, list(keep), len(rows), len(kept), empty, rejected)
