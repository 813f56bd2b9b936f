"""Model merging at mergekit parity: methods registered by name, a YAML config, a streaming executor.

Methods (one module each): `linear`, `task_arithmetic`, `ties`, `dare_linear`, `dare_ties`, `slerp`,
`magnitude_prune`, with mergekit 0.1.5's parameter names, defaults and semantics, so a mergekit YAML
(`models:` form) runs unchanged: `run_merge("merge.yaml", "out/")`.

Two deliberate departures, both documented where they live: TIES' magnitude trim keeps exactly
`max(1, int(density * n))` entries and, among entries tied at the threshold, the lowest indices
(deterministic; mergekit's unstable argsort keeps an unspecified subset: `sparsify`); and floating
tensors are merged in fp32 (fp64 for float64) and written in the input dtype unless the config's
`out_dtype:` or `dtype:` names another, where mergekit computes in the input dtype (`executor`).
"""

from graft.merge import dare_linear, dare_ties, linear, magnitude_prune, slerp, task_arithmetic, ties  # noqa: F401  (register)
from graft.merge.base import MERGE_METHODS, MethodSpec, Param, TensorTask, merge_method
from graft.merge.config import MergeConfig, MergeConfigError, load_merge_config, parse_merge_config
from graft.merge.executor import execute_plan, plan_merge, run_merge

__all__ = ["MERGE_METHODS", "MergeConfig", "MergeConfigError", "MethodSpec", "Param", "TensorTask", "execute_plan",
           "load_merge_config", "merge_method", "parse_merge_config", "plan_merge", "run_merge"]
