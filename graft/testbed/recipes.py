"""How each testbed model is made: from scratch or from another testbed model, on which data.

A recipe is plain data; the pipeline's `testbed` stage turns recipes into training runs (all of
them in one Ray Train run, in order, so later recipes can start from earlier ones).

- `base-v1`: the base, pretrained from scratch on `general`;
- `base-v2` … `base-vN` (N = `versions`, 3 by default): each a continued pretraining of the version
  before it on fresh `general` data, the "evolved versions" a provider ships (PortLLM's setting);
- `target-large`: 2x width and depth, pretrained on `general` with a share of `shout` (ConTrans's larger
  model: it knows the concept, answering in upper case, but shows it only when asked);
- `source-hetero`: another architecture family and size, trained on `general` plus one skill
  (GraftLLM's heterogeneous source);
- `aligned-small`: base-v1 fine-tuned to show the `concept` behaviour when asked (`shout`), still copying as
  before otherwise (ConTrans's source: asked and unasked, it differs by the concept's direction).
"""

from __future__ import annotations

from dataclasses import dataclass

OTHER_MODELS = ("target-large", "source-hetero", "aligned-small")
MAX_VERSIONS = 9
ALIGNED_REPLAY_FRACTION = 0.5  # aligned-small keeps copying as asked while it learns to shout when asked
SHOUT_FRACTION = 0.2  # target-large's share of `shout` batches: it can show the concept on request, never unasked


def model_names(versions: int = 3) -> tuple[str, ...]:
    """The testbed models there are when the base-version chain has `versions` versions."""
    return tuple(f"base-v{k}" for k in range(1, versions + 1)) + OTHER_MODELS


MODELS = model_names()
LARGER = {"tiny": "small", "mini": "small", "small": "large"}


@dataclass(frozen=True)
class DataRef:
    """A testbed dataset: `skill` examples from generator seed `seed`, `n` of them for training."""

    skill: str
    n: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.skill}-s{self.seed}"


@dataclass(frozen=True)
class Recipe:
    name: str
    data: DataRef
    steps: int
    lr: float
    family: str | None = None  # from scratch: family and size ...
    size: str | None = None
    parent: str | None = None  # ... or continued from another recipe's model
    replay: DataRef | None = None
    replay_fraction: float = 0.0


def testbed_recipes(models: list[str], *, family: str, size: str, seed: int, pretrain_examples: int, pretrain_steps: int,
                    lr: float, evolve_steps: int, align_steps: int, target_steps: int, source_skill: str, source_family: str,
                    source_steps: int, source_replay_fraction: float, versions: int = 3,
                    evolve_lr: float | None = None) -> list[Recipe]:
    """Recipes for `models` (and whatever they start from), parents before children.

    `evolve_lr` is the peak learning rate of each continued pretraining base-v(k-1) → base-vk (default `lr / 3`): how far
    a version moves from the one before, the drift a patch ported across it has to survive.

    Steps are set per model because the models learn at different speeds: the larger target learns the
    shared format in far fewer steps than the base, and a model pretrained on one skill needs its own count.
    """
    general = DataRef("general", pretrain_examples, seed)
    book = {
        "base-v1": Recipe("base-v1", general, pretrain_steps, lr, family=family, size=size),
        **{f"base-v{k}": Recipe(f"base-v{k}", DataRef("general", pretrain_examples, seed + k - 1), evolve_steps,
                                lr / 3 if evolve_lr is None else evolve_lr,
                                parent=f"base-v{k - 1}") for k in range(2, versions + 1)},
        "target-large": Recipe("target-large", general, target_steps, lr, family=family, size=LARGER.get(size, "large"),
                               replay=DataRef("shout", pretrain_examples, seed), replay_fraction=SHOUT_FRACTION),
        "source-hetero": Recipe("source-hetero", DataRef(source_skill, pretrain_examples, seed), source_steps, lr,
                                family=source_family, size="mini", replay=general if source_replay_fraction else None,
                                replay_fraction=source_replay_fraction),
        "aligned-small": Recipe("aligned-small", DataRef("shout", pretrain_examples, seed), align_steps, lr / 3,
                                parent="base-v1", replay=general, replay_fraction=ALIGNED_REPLAY_FRACTION),
    }
    unknown = set(models) - set(book)
    if unknown:
        raise ValueError(f"unknown testbed model {sorted(unknown)[0]!r}; known: {', '.join(model_names(versions))}")
    order: list[str] = []

    def need(name: str) -> None:
        parent = book[name].parent
        if parent:
            need(parent)
        if name not in order:
            order.append(name)

    for m in models:
        need(m)
    return [book[m] for m in order]
