"""Live training progress on the driver's console: step/total, loss, steps/s, ETA and elapsed time.

Ray Train workers' output does not reach the driver (graftline starts Ray with `log_to_driver` off, or its workers'
library noise would drown the console), and a submitted job's log is its driver's output. So rank 0 writes where it
is (`Position`: job, step, loss, seconds trained) to a small JSON file per job in the training run's scratch folder, on
the storage every node sees, at most every `WRITE_EVERY_S` and at the job's last step; a thread on the driver
(`ProgressPrinter`) prints a line from each file that moved every `PRINT_EVERY_S`, and says that the worker group is
starting until the first position arrives. Every job's last position is printed, at the latest when the run ends,
so even a run shorter than one interval shows each job's final step and loss.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

WRITE_EVERY_S = 2.0
PRINT_EVERY_S = 10.0


def position_file(folder: Path, job: int) -> Path:
    return Path(folder) / f"progress-{job}.json"


@dataclass(frozen=True)
class Position:
    """Where rank 0 is: the job (its index in the run), the step done, the job's steps, the mean loss of that step
    across ranks, and the seconds spent training it (checkpoint saves excluded)."""

    job: int
    step: int
    steps: int
    loss: float
    train_seconds: float


def write_position(path: Path, position: Position) -> None:
    """Replace `path` with `position`, whole (a reader never sees half a file)."""
    part = path.with_name(f".{path.name}.part")
    part.write_text(json.dumps(asdict(position)))
    os.replace(part, path)


def read_position(path: Path) -> Position | None:
    """The latest position, or None before the first (or when the file is not there any more)."""
    try:
        return Position(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 1h02m; '?' when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(position: Position, names: Sequence[str], elapsed: float) -> str:
    """One console line for `position` (`names`: each job's name, by index; `elapsed`: seconds since the run started)."""
    rate = position.step / position.train_seconds if position.train_seconds > 0 else 0.0
    eta = (position.steps - position.step) / rate if rate > 0 else None
    which = f" (job {position.job + 1}/{len(names)})" if len(names) > 1 else ""
    return (f"  {names[position.job]}{which}: step {position.step}/{position.steps}  loss {position.loss:.4f}  "
            f"{rate:.2f} steps/s  ETA {duration(eta)}  elapsed {duration(elapsed)}")


class ProgressPrinter:
    """Prints a training run's progress from the position files in `folder` while the block runs (a thread, stopped
    when the block ends)."""

    def __init__(self, folder: Path, names: Sequence[str], workers: int, log: Callable[[str], None],
                 every: float = PRINT_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.names, self.workers, self.log, self.every, self.clock = Path(folder), list(names), workers, log, every, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training-progress", daemon=True)
        self._shown: dict[int, Position] = {}
        self._started = 0.0

    def __enter__(self) -> "ProgressPrinter":
        self._started = self.clock()
        self.log(f"  starting {self.workers} training worker{'s' if self.workers != 1 else ''} (Ray Train, DeepSpeed)…")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._show(final=True)

    def _show(self, final: bool = False) -> None:
        moved = [p for i in range(len(self.names)) if (p := read_position(position_file(self.folder, i))) is not None
                 and p != self._shown.get(i)]
        if not moved and not self._shown and not final:
            self.log(f"  still starting the worker group… {duration(self.clock() - self._started)}")
        for position in moved:
            self._shown[position.job] = position
            self.log(progress_line(position, self.names, self.clock() - self._started))

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._show()
