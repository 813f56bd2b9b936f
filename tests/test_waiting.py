"""The driver's progress while a stage waits on its Ray tasks: a line with a bar as each task ends, and a line at least
every interval while none does, naming what still runs; results come back by key, and a task's error is raised."""

from __future__ import annotations

import time

import pytest

from pipelines.runtime import ray_session
from pipelines.waiting import as_completed, bar, gather


def test_bar_counts_cells():
    assert bar(0, 5) == "[----------] 0/5"
    assert bar(2, 5) == "[####------] 2/5"
    assert bar(5, 5) == "[##########] 5/5"
    assert bar(0, 0) == "[##########] 0/0"


@pytest.mark.integration
def test_waiting_on_tasks_shows_progress_and_keeps_keys():
    import ray

    lines: list[str] = []
    with ray_session(None, num_cpus=2):
        @ray.remote(num_cpus=1)
        def sleep_then(value: int, seconds: float, after: int | None = None) -> int:
            time.sleep(seconds)
            return value

        @ray.remote(num_cpus=1)
        def fail() -> None:
            raise ValueError("tensor q_proj: no such module")

        fast = sleep_then.remote(2, 0.0)
        refs = {"slow": sleep_then.remote(1, 2.5, after=fast), "fast": fast}  # slow starts once fast is done
        assert gather(refs, "evaluate", lines.append, unit="models", every=0.5) == {"slow": 1, "fast": 2}
        assert list(gather(refs, "again", lambda _: None)) == ["slow", "fast"]  # `refs`' order, not finishing order
        with pytest.raises(Exception, match="no such module"):
            dict(as_completed({"bad": fail.remote()}, "pack", lambda _: None))
    ends = [line for line in lines if line.endswith(" done")]
    assert ends[0].startswith("  evaluate [#####-----] 1/2 models, ") and ends[0].endswith("fast done")
    assert ends[1].startswith("  evaluate [##########] 2/2 models, ") and ends[1].endswith("slow done")
    waiting = lines[lines.index(ends[0]) + 1:lines.index(ends[1])]
    assert len(waiting) >= 2 and all(line.endswith("running: slow") for line in waiting)  # never silent for an interval
