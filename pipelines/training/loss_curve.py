"""What a finished training run's loss curve says that its final loss alone does not.

A run whose learning rate is too high can fall for a few dozen steps, jump, and settle well above its best: its
final loss still looks like progress from the first steps, and the run succeeds with an expert that has forgotten
more than it learned (seen on the `small` testbed base: a LoRA at lr 0.01 bottomed out at 2.2 by step 20 of 1000
and ended at 3.0, scoring 0 on its skill and on `general`). A healthy run's lowest loss comes near its end.
"""

from __future__ import annotations

import math

WINDOW = 10  # steps per mean: one step's loss is too noisy to compare
EARLY = 0.25  # the best window in this first share of the steps ...
ABOVE = 1.2  # ... and the last window this many times above it: the run went backwards


def went_backwards(losses: list[float]) -> str | None:
    """Why the curve looks like a run that diverged after an early best, or None. Runs shorter than ten windows are
    not judged (their windows are too few to tell a curve from noise)."""
    if len(losses) < 10 * WINDOW:
        return None
    means = [sum(losses[i:i + WINDOW]) / WINDOW for i in range(0, len(losses) - WINDOW + 1, WINDOW)]
    finite = [i for i, m in enumerate(means) if math.isfinite(m)]
    if not finite:
        return "the loss was not finite in any 10 steps"
    best = min(finite, key=means.__getitem__)
    final = means[-1]
    if not math.isfinite(final):
        return f"the loss became {final} (its lowest 10-step mean was {means[best]:.3g}, at step {best * WINDOW})"
    if best * WINDOW < EARLY * len(losses) and final > ABOVE * means[best]:
        return (f"the loss was lowest at step {best * WINDOW} of {len(losses)} ({means[best]:.3g}) and ended at {final:.3g}, "
                f"{final / means[best]:.1f}× that: the run went backwards (a learning rate too high?)")
    return None
