"""Model merging at mergekit parity: methods registered by name, a YAML config, a streaming executor.

Methods (one module each): `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`,
`magnitude_prune`, with mergekit 0.1.5's parameter names, defaults and semantics, so a mergekit YAML
(`models:` form) runs unchanged: `run_merge("merge.yaml", "out/")`.
"""

from graft.merge import dare_linear, dare_ties, linear, magnitude_prune, slerp, task_arithmetic, ties  # noqa: F401  (register)
from graft.merge.base import MERGE_METHODS, MethodSpec, Param, TensorTask, merge_method
from graft.merge.config import MergeConfig, MergeConfigError, load_merge_config, parse_merge_config
from graft.merge.executor import execute_plan, plan_merge, run_merge

__all__ = ["MERGE_METHODS", "MergeConfig", "MergeConfigError", "MethodSpec", "Param", "TensorTask", "execute_plan",
           "load_merge_config", "merge_method", "parse_merge_config", "plan_merge", "run_merge"]
