"""What every stage receives (the job, where to write, the tracker) and what it hands on."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.atomic import atomic_dir
from pipelines.cache import read_marker, write_marker
from pipelines.spec import JobSpec
from pipelines.tracking import RunHandle, Tracker


@dataclass
class StageResult:
    """A finished stage: output folder and content key per item, headline metrics, timing."""

    name: str
    outputs: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    spec: JobSpec
    job_file: Path
    root: Path  # <output_dir>/<job name>
    tracker: Tracker
    parent: RunHandle
    force: frozenset[str]
    results: dict[str, StageResult] = field(default_factory=dict)
    log: Callable[[str], None] = print

    def output_path(self, stage: str, item: str, key: str) -> Path:
        return self.root / stage / f"{item}-{key}"

    def run_item(self, stage: str, item: str, key: str, params: dict[str, Any],
                 build: Callable[[Path, RunHandle], dict[str, float]], result: StageResult) -> Path:
        """Build one output folder under a child run, or reuse it when its key is already complete.

        `build(tmp_folder, run)` writes the outputs and returns metrics; the folder is renamed into
        place only after it returns, together with a marker holding the key and the metrics.
        """
        path = self.output_path(stage, item, key)
        name = stage if item == stage else f"{stage}/{item}"
        with self.tracker.run(name, parent=self.parent, tags={"graftline.stage": stage, "graftline.item": item,
                                                               "graftline.key": key}) as run:
            run.params(params)
            if path.is_dir() and stage not in self.force and "all" not in self.force:
                metrics = read_marker(path).get("metrics", {})
                run.tags({"graftline.cached": "true", "graftline.output": str(path)})
                result.cached += 1
                self.log(f"  {name}: reusing {path}")
            else:
                t0 = time.time()
                with atomic_dir(path) as tmp:
                    metrics = build(tmp, run) or {}
                    metrics = {**metrics, "seconds": time.time() - t0}
                    write_marker(tmp, {"stage": stage, "item": item, "key": key, "metrics": metrics})
                run.tags({"graftline.cached": "false", "graftline.output": str(path)})
            run.metrics(metrics)
        result.outputs[item] = path
        result.keys[item] = key
        result.metrics.update({f"{item}.{k}": v for k, v in metrics.items() if k != "seconds"})
        return path
