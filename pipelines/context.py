"""What every stage receives (the job, where to write, the tracker, the artifacts so far) and what it hands on."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graft.atomic import OutputError, OutputMarker, atomic_dir, read_marker, write_marker
from pipelines.artifacts import Board
from pipelines.spec import JobSpec
from pipelines.tracking import RunHandle, Tracker


@dataclass
class StageResult:
    """A finished stage: the artifacts it hands on, and for the summary its folders, keys, headline metrics, timing."""

    name: str
    artifacts: list[object] = field(default_factory=list)
    outputs: dict[str, Path] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    runs: dict[str, str] = field(default_factory=dict)  # item -> the MLflow run id of its child run
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cached: int = 0
    warnings: list[str] = field(default_factory=list)  # what the user must see although the stage succeeded


@dataclass
class RunContext:
    """One job's run: its spec, where it writes, its MLflow runs, and the artifacts its stages wrote so far."""

    spec: JobSpec
    job_file: Path
    root: Path  # <output_dir>/<job name>
    tracker: Tracker
    parent: RunHandle
    force: frozenset[str]
    board: Board = field(default_factory=Board)
    log: Callable[[str], None] = print
    order: Mapping[str, int] = field(default_factory=dict)  # stage -> its place in the recipe, from 1

    def run_name(self, stage: str, item: str) -> str:
        """A child run's name: `03 score/reverse`. The stage's place in the recipe comes first, so a job's runs sort by
        name in pipeline order (the UI's default, newest first, lists them backwards)."""
        label = _label(stage, item)
        return f"{self.order[stage]:02d} {label}" if stage in self.order else label

    def output_path(self, stage: str, item: str, key: str) -> Path:
        return self.root / stage / f"{item}-{key}"

    def run_item(self, stage: str, item: str, key: str, params: dict[str, Any],
                 build: Callable[[Path, RunHandle], dict[str, float]], result: StageResult) -> Path:
        """Build one output folder under a child run, or reuse it when its key is already complete.

        `build(tmp_folder, run)` writes the outputs and returns metrics; the folder is renamed into
        place only after it returns, together with a marker holding the key and the metrics.
        """
        paths = self.run_items(stage, [Item(item, key, params)], lambda todo: {item: build(*todo[item])}, result)
        return paths[item]

    def run_items(self, stage: str, items: list["Item"],
                  build: Callable[[dict[str, tuple[Path, RunHandle]]], dict[str, dict[str, float]]],
                  result: StageResult) -> dict[str, Path]:
        """Like `run_item` for several items built together (e.g. models trained in one Ray Train run).

        Complete items are reused; `build` gets {item: (tmp_folder, run)} for the others and returns
        their metrics. If it raises, every open run is marked FAILED and no folder is renamed.
        """
        paths: dict[str, Path] = {}
        todo: dict[str, tuple[Path, RunHandle]] = {}
        with ExitStack() as stack:
            for it in items:
                path = self.output_path(stage, it.name, it.key)
                paths[it.name] = path
                run = stack.enter_context(self.tracker.run(self.run_name(stage, it.name), parent=self.parent, tags={
                    "graftline.stage": stage, "graftline.item": it.name, "graftline.key": it.key}))
                run.params(it.params)
                result.runs[it.name] = run.run_id
                forced = stage in self.force or "all" in self.force
                if (path.exists() or path.is_symlink()) and not forced:
                    marker = read_marker(path)
                    if marker is None or marker.key != it.key or not path.is_dir():
                        raise OutputError(f"{path}: exists but is not a complete output graftline wrote for this step; "
                                          "move it away (it is never replaced)")
                    metrics = marker.metrics
                    run.tags({"graftline.cached": "true", "graftline.output": str(path)})
                    run.metrics(metrics)
                    result.cached += 1
                    self._record(result, it, path, metrics)
                    self.log(f"  {_label(stage, it.name)}: reusing {path}")
                else:
                    todo[it.name] = (stack.enter_context(atomic_dir(path, overwrite=forced)), run)
            if todo:
                t0 = time.time()
                built = build(todo)
                seconds = time.time() - t0
                for it in items:
                    if it.name in todo:
                        tmp, run = todo[it.name]
                        metrics = {**(built.get(it.name) or {}), "seconds": seconds}
                        write_marker(tmp, OutputMarker(kind="stage", stage=stage, item=it.name, key=it.key, metrics=metrics))
                        run.tags({"graftline.cached": "false", "graftline.output": str(paths[it.name]),
                                  **({"graftline.built_with": ",".join(todo)} if len(todo) > 1 else {})})
                        run.metrics(metrics)
                        self._record(result, it, paths[it.name], metrics)
        return paths

    @staticmethod
    def _record(result: StageResult, it: "Item", path: Path, metrics: dict[str, float]) -> None:
        result.outputs[it.name] = path
        result.keys[it.name] = it.key
        result.metrics.update({f"{it.name}.{k}": v for k, v in metrics.items() if k != "seconds"})


def _label(stage: str, item: str) -> str:
    """How an item is named on the console: `score/reverse`, or the stage alone for its one item of the same name."""
    return stage if item == stage else f"{stage}/{item}"


@dataclass(frozen=True)
class Item:
    """One output of a stage: its name, content key and the params its MLflow run records."""

    name: str
    key: str
    params: dict[str, Any]
