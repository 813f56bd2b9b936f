"""Seeded generators of synthetic skills, each a stream of (prompt, answer) pairs.

Every skill writes a prompt of the form `task:input=` and expects `answer`. Train and held-out
splits are disjoint by construction: a prompt's split is decided by a hash of the prompt itself, so
no held-out prompt can ever appear in training data, whatever the sizes or seeds.
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable

from graft.registry import Registry

Example = dict[str, str]
SKILLS: Registry[Callable[[random.Random], Example]] = Registry("skill generator")

LETTERS = string.ascii_lowercase
HELD_OUT_PERCENT = 20


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


@SKILLS.register("general")
def general(rng: random.Random) -> Example:
    """The shared format every model is pretrained on: copy a short string."""
    s = _word(rng, 2, 8, LETTERS + string.digits)
    return {"prompt": f"copy:{s}=", "answer": s}


@SKILLS.register("reverse")
def reverse(rng: random.Random) -> Example:
    s = _word(rng, 3, 7)
    return {"prompt": f"rev:{s}=", "answer": s[::-1]}


@SKILLS.register("sort")
def sort(rng: random.Random) -> Example:
    s = _word(rng, 3, 6)
    return {"prompt": f"sort:{s}=", "answer": "".join(sorted(s))}


@SKILLS.register("add")
def add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"prompt": f"add:{a}+{b}=", "answer": str(a + b)}


def split_of(prompt: str) -> str:
    """'test' for a fixed ~20% of all possible prompts, 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
    return "test" if h % 100 < HELD_OUT_PERCENT else "train"


def generate(skill: str, split: str, n: int, seed: int) -> list[Example]:
    """`n` distinct examples of `skill` from `split` ('train' or 'test'), deterministic for `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    make = SKILLS.get(skill)
    rng = random.Random(f"{skill}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"skill {skill!r} has too few distinct {split} prompts for n={n}")
        ex = make(rng)
        if ex["prompt"] in seen or split_of(ex["prompt"]) != split:
            continue
        seen.add(ex["prompt"])
        out.append(ex)
    return out
