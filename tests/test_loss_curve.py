"""The train stage's warning for a run that went backwards: an early best, then a loss settled well above it."""

from __future__ import annotations

import math

from pipelines.training.loss_curve import went_backwards


def _falling(n: int) -> list[float]:
    return [7.0 * math.exp(-i / 50) + 0.01 * (i % 3) for i in range(n)]


def test_a_run_whose_loss_keeps_falling_is_not_flagged():
    assert went_backwards(_falling(1000)) is None


def test_a_run_that_bottoms_out_early_and_ends_well_above_its_best_is_flagged_with_where():
    curve = _falling(30) + [2.0] * 10 + [3.2] * 960  # the LoRA at lr 0.01 on the small base: 2.2 at step 20, 3.0 at the end
    message = went_backwards(curve)
    assert message is not None and "lowest at step 30 of 1000 (2)" in message and "ended at 3.2" in message


def test_only_an_early_best_with_an_end_well_above_it_is_flagged():
    assert went_backwards([3.0] * 300 + [1.0] * 10 + [1.5] * 690) is None  # the best after the first quarter
    assert went_backwards([2.0] * 100 + [2.3] * 900) is None  # ended within 20% of its early best
    assert went_backwards([3.0] * 240 + [1.0] * 10 + [1.5] * 750) is not None  # the best at step 240 of 1000


def test_a_loss_that_became_nan_is_flagged_and_short_runs_are_not_judged():
    assert "became nan" in went_backwards(_falling(200) + [float("nan")] * 10)
    assert went_backwards([float("nan")] * 100) == "the loss was not finite in any 10 steps"
    assert went_backwards([1.0] * 10 + [9.0] * 89) is None  # under 100 steps
