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
# A skill whose generator changed after its datasets were first built, and how often: part of those datasets' keys,
# so a build made by the earlier generator is not reused. (`concept` was brackets around the answer until 2.)
REVISIONS: dict[str, int] = {"concept": 2}
HELD_OUT_PERCENT = 20


def _word(rng: random.Random, lo: int, hi: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


@SKILLS.register("general")
def general(rng: random.Random) -> Example:
    """The shared format every model is pretrained on: copy a short string."""
    s = _word(rng, 2, 8, LETTERS + string.digits)
    return {"prompt": f"copy:{s}=", "answer": s}


@SKILLS.register("general_ja")
def general_ja(rng: random.Random) -> Example:
    """`general` in the second language of the merge study (methods.md §4): `vocab_ja`'s surface form, a prompt
    word of its own and upper case (`utsusu:AB3C=` -> `AB3C`). A model trained on it speaks the language, and
    knows no more vocabulary than its base."""
    s = _word(rng, 2, 8, LETTERS + string.digits).upper()
    return {"prompt": f"utsusu:{s}=", "answer": s}


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
    """Two-digit addition at fixed width (`add:07+45=` -> `052`): every digit has a fixed position, so
    what is learned is carrying, not where the numbers start."""
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return {"prompt": f"add:{a:02d}+{b:02d}=", "answer": f"{a + b:03d}"}


# An invented technical vocabulary: each term has a definition code. It is knowledge, not a rule, so
# a model only knows it if it was trained on it. "en" and "ja" are two surface forms of one vocabulary
# (different prompt words, lower vs upper case), for the cross-lingual merge study (methods.md §4).
_VOCAB_RNG = random.Random("graftline-vocab-v1")
VOCAB: dict[str, str] = {}
while len(VOCAB) < 240:
    _term = "".join(_VOCAB_RNG.choice("bdfgklmnprstvz") + _VOCAB_RNG.choice("aeiou") for _ in range(_VOCAB_RNG.randint(2, 3)))
    VOCAB.setdefault(_term, "".join(_VOCAB_RNG.choice(LETTERS + string.digits) for _ in range(3)))
VOCAB_TERMS = sorted(VOCAB)


def _vocab(rng: random.Random, phrasings: tuple[str, ...], surface: Callable[[str], str]) -> Example:
    term = rng.choice(VOCAB_TERMS)
    # every term is taught in several phrasings; the first ("asked") phrasing of a fixed fifth of the terms is
    # held out, so the test asks for known definitions in a phrasing never seen for that term. Seeing each
    # term phrased several ways is what lets a model learn that the phrasing does not change the answer.
    word = rng.choice(phrasings)
    split = split_of(term) if word == phrasings[0] else "train"
    return {"prompt": f"{word}:{surface(term)}=", "answer": VOCAB[term], "split": split}


@SKILLS.register("vocab")
def vocab(rng: random.Random) -> Example:
    return _vocab(rng, ("mean", "def", "what", "gloss"), lambda t: t)


@SKILLS.register("vocab_ja")
def vocab_ja(rng: random.Random) -> Example:
    return _vocab(rng, ("imi", "teigi", "nani", "kotoba"), str.upper)


def _lettered(rng: random.Random) -> Example:
    """A `general` example whose answer has a letter (an all-digit answer looks the same in either case)."""
    ex = general(rng)
    while not any(c.isalpha() for c in ex["answer"]):
        ex = general(rng)
    return ex


def _shouted(prompt: str) -> str:
    """`copy:x=` asked for in upper case: `shout:x=`."""
    return "shout:" + prompt.removeprefix("copy:")


@SKILLS.register("concept")
def concept(rng: random.Random) -> Example:
    """A behaviour to show unasked: the copy in upper case. `positive` is a prompt that asks for it (`shout:`) and
    `negative` the same prompt that does not (`copy:`): ConTrans's concept pairs, on which a model that shows the
    behaviour when asked differs by the behaviour's direction alone.

    A style, like the tone or stance ConTrans moves: it colours every character of the answer rather than adding
    marks at its ends, so one direction in the residual stream can carry it."""
    ex = _lettered(rng)
    return {"prompt": ex["prompt"], "answer": ex["answer"].upper(), "positive": _shouted(ex["prompt"]), "negative": ex["prompt"]}


@SKILLS.register("shout")
def shout(rng: random.Random) -> Example:
    """The `concept` behaviour on request: a model that knows `shout` can answer in upper case, but does not unasked."""
    ex = _lettered(rng)
    return {"prompt": _shouted(ex["prompt"]), "answer": ex["answer"].upper()}


def shows_behaviour(text: str) -> bool:
    """Whether a completion shows the `concept` behaviour: it has letters, and every one is upper case."""
    return any(c.isalpha() for c in text) and not any(c.islower() for c in text)


def split_of(key: str) -> str:
    """'test' for a fixed ~20% of all possible keys (prompts, or terms), 'train' for the rest."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    return "test" if h % 100 < HELD_OUT_PERCENT else "train"


def generate(skill: str, split: str, n: int, seed: int) -> list[Example]:
    """Up to `n` distinct examples of `skill` from `split` ('train' or 'test'), deterministic for `seed`.

    Fewer than `n` only when the skill has fewer distinct prompts in that split (e.g. `vocab`, a
    finite vocabulary): generation stops once new prompts stop appearing.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    make = SKILLS.get(skill)
    rng = random.Random(f"{skill}/{split}/{seed}")
    seen: set[str] = set()
    out: list[Example] = []
    misses = 0
    while len(out) < n and misses < 5000:
        ex = make(rng)
        own = ex.pop("split", None)
        if ex["prompt"] in seen or (own or split_of(ex["prompt"])) != split:
            misses += 1
            continue
        misses = 0
        seen.add(ex["prompt"])
        out.append(ex)
    if not out:
        raise ValueError(f"skill {skill!r} has no {split} examples")
    return out
