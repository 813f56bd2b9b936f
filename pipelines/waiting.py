"""Waiting on a stage's Ray tasks on the driver, with progress a user can see.

A stage that fans out (pack per skill, evaluate per model, score per shard, merges per row) would otherwise sit on
`ray.get` in silence: its tasks' own output does not reach the driver (graftline starts Ray with `log_to_driver` off).
Here each task's end is a line with a bar (`[####------] 2/5`), and while none ends, a line at least every
`PRINT_EVERY_S` says what is still running and for how long. Lines, not a redrawn bar, so that a submitted job's
log (a file) reads the same as the console.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, TypeVar

from pipelines.training.progress import PRINT_EVERY_S, duration

K = TypeVar("K", bound=Hashable)
BAR_WIDTH = 10


def bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    """`[####------] 2/5`: `done` of `total` as a bar of `width` cells."""
    filled = width * done // total if total else width
    return f"[{'#' * filled}{'-' * (width - filled)}] {done}/{total}"


def _names(keys: list, limit: int = 3) -> str:
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def as_completed(refs: Mapping[K, Any], what: str, log: Callable[[str], None], *, unit: str = "tasks",
                 every: float = PRINT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> Iterator[tuple[K, Any]]:
    """Yield `(key, result)` for each of `refs` (Ray object refs by key) as its task finishes, logging progress as
    `  <what> [##--] k/N <unit>` lines; a task's error is raised when it is reached. Each result is fetched and
    yielded once, and the generator keeps no reference to it afterwards (a caller can fold large partial results)."""
    import ray

    pending = {ref: key for key, ref in refs.items()}
    del refs  # a finished task's ref (and its result in the object store) is held by nothing here once yielded
    total, started = len(pending), clock()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=every)
        if not done:
            log(f"  {what} {bar(total - len(pending), total)} {unit}, {duration(clock() - started)}; "
                f"running: {_names(list(pending.values()))}")
            continue
        key = pending.pop(done[0])
        value = ray.get(done[0])
        del done
        log(f"  {what} {bar(total - len(pending), total)} {unit}, {duration(clock() - started)}; {key} done")
        yield key, value


def gather(refs: Mapping[K, Any], what: str, log: Callable[[str], None], *, unit: str = "tasks",
           every: float = PRINT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> dict[K, Any]:
    """Every result of `refs`, by key in `refs`' order, with the progress of `as_completed`."""
    results = dict(as_completed(refs, what, log, unit=unit, every=every, clock=clock))
    return {k: results[k] for k in refs}
