"""The searchers behind evolutionary merging: Optuna samplers by name, driven by Ray Tune's OptunaSearch.

`cmaes` is CMA-ES, the evolution strategy evolutionary model merging uses; `tpe` and `random` are there to
compare against. Each takes the search's seed, so a search is repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from graft.registry import Registry

SAMPLERS: Registry[Callable[[int], Any]] = Registry("merge search")


@SAMPLERS.register("cmaes")
def cmaes(seed: int) -> Any:
    import optuna

    return optuna.samplers.CmaEsSampler(seed=seed)


@SAMPLERS.register("tpe")
def tpe(seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


@SAMPLERS.register("random")
def random_sampler(seed: int) -> Any:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)
