"""EleutherAI's lm-evaluation-harness (`lm-eval`) as graftline uses it: the field's evaluator beside our own.

- A skill's held-out JSONL becomes an lm-eval task (`skill_task_config`, `write_skill_task`): generate_until,
  greedy, stopped at the tokenizer's end of sequence, scored by exact match. Any graftline accuracy on those
  rows can then be recomputed with a tool nobody here wrote.
- What a job names (built-in task names, task YAML files, folders of them) becomes the task names and include
  paths lm-eval wants (`select_tasks`); `task_problems` checks, before any model is loaded, that every task
  is known and that its dataset loads here (offline, on a cluster without the hub, that is what fails).
- `run_tasks` runs lm-eval's `simple_evaluate` on a model instance through `HFLM`: an HF model, a PEFT model
  with its adapter kept unmerged, or a routed model, so what lm-eval measures is the model as graftline holds it.
- `metrics_of` flattens lm-eval's results to {task: {metric: value}}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TASK_PREFIX = "graftline_"
TASK_SUFFIX = ".yaml"  # lm-eval's task index reads `*.yaml` only


class HarnessError(ValueError):
    """A task list lm-eval cannot run: the message names the task or file."""


def skill_task_name(skill: str) -> str:
    return f"{TASK_PREFIX}{skill}"


def skill_task_config(skill: str, test_file: Path, max_new_tokens: int) -> dict[str, Any]:
    """An lm-eval task over a held-out JSONL of {prompt, answer} rows that scores what graftline's `exact_match` does:
    the greedy completion of the prompt as given (no few-shot, no delimiter), cut at end of sequence, equal to the
    answer."""
    return {
        "task": skill_task_name(skill),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(Path(test_file).resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "num_fewshot": 0,
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "source": "graftline testbed skill", "skill": skill},
    }


def write_skill_task(skill: str, rows: Sequence[dict[str, str]], out: Path, max_new_tokens: int,
                     final: Path | None = None) -> Path:
    """`out/<skill>.test.jsonl` (the rows) and `out/graftline_<skill>.yaml` (the task over them); returns the YAML.
    `final`: where `out` will be once moved into place (the task names its data file by absolute path)."""
    out.mkdir(parents=True, exist_ok=True)
    data = f"{skill}.test.jsonl"
    (out / data).write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    task = out / f"{skill_task_name(skill)}{TASK_SUFFIX}"
    task.write_text(yaml.safe_dump(skill_task_config(skill, (final or out) / data, max_new_tokens), sort_keys=False))
    return task


@dataclass(frozen=True)
class TaskSelection:
    """The tasks a job names, as lm-eval takes them."""

    names: tuple[str, ...]  # task (or group) names, in the job's order
    include_paths: tuple[str, ...]  # folders lm-eval indexes for the job's own task YAMLs
    defaults: bool  # a built-in name is named: lm-eval's own index (thousands of tasks) is needed

    def task_manager(self):
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=list(self.include_paths) or None, include_defaults=self.defaults)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML read as lm-eval reads it (its `!function` tags left unresolved), or HarnessError naming the file."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        return load_yaml(path, resolve_func=False, recursive=False)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise HarnessError(f"{path}: not a readable task YAML ({_first_line(e)})") from None


def _names_in(cfg: dict[str, Any]) -> list[str]:
    return [cfg[k] for k in ("task", "group") if isinstance(cfg.get(k), str)]


def task_files(entry: str) -> list[Path]:
    """The task YAMLs an entry names: the file itself, or every `*.yaml` under a folder; none for a built-in name."""
    path = Path(entry).expanduser()
    if path.is_dir():
        return sorted(path.rglob(f"*{TASK_SUFFIX}"))
    return [path] if path.is_file() else []


def data_files(task: Path) -> list[Path]:
    """The local files a task YAML reads its dataset from (`dataset_kwargs.data_files`), those that exist."""
    named = _task_yaml(task).get("dataset_kwargs", {}).get("data_files", {})
    values = named.values() if isinstance(named, dict) else [named]
    return sorted(Path(v) for v in values if isinstance(v, str) and Path(v).is_file())


def select_tasks(entries: Sequence[str]) -> TaskSelection:
    """Each entry a built-in task name, a task YAML file (`*.yaml`), or a folder of them (every task it defines);
    HarnessError names an entry that is a missing file, an unreadable YAML or a folder without tasks."""
    names: list[str] = []
    include: list[str] = []
    defaults = False
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = [n for f in task_files(entry) for n in _names_in(_task_yaml(f))]
            if not found:
                raise HarnessError(f"{entry}: a folder without lm-eval task YAMLs (`*{TASK_SUFFIX}` with a `task` key)")
            names += found
            include.append(str(path.resolve()))
        elif entry.endswith((".yaml", ".yml")) or "/" in entry:
            if not path.is_file():
                raise HarnessError(f"{entry}: no such task YAML file")
            if path.suffix != TASK_SUFFIX:
                raise HarnessError(f"{entry}: lm-eval indexes task files named *{TASK_SUFFIX} only")
            found = _names_in(_task_yaml(path))
            if not found:
                raise HarnessError(f"{entry}: a task YAML needs a `task` (or `group`) name")
            names += found[:1]
            include.append(str(path.parent.resolve()))
        else:
            names.append(entry)
            defaults = True
    return TaskSelection(tuple(dict.fromkeys(names)), tuple(dict.fromkeys(include)), defaults)


def task_problems(selection: TaskSelection) -> list[str]:
    """One line per task lm-eval does not know, or whose dataset does not load here; no model is loaded."""
    from lm_eval.tasks import get_task_dict

    manager = selection.task_manager()
    known = set(manager.all_tasks)
    problems = [f"task {n!r}: unknown to lm-eval" + ("" if selection.defaults else " (not in the job's task files)")
                for n in selection.names if n not in known]
    for name in (n for n in selection.names if n in known):
        try:
            get_task_dict([name], manager)
        except Exception as e:  # noqa: BLE001 - any failure to build a task (a dataset not reachable, a bad config) is the same line
            problems.append(f"task {name!r}: its dataset cannot be loaded here ({type(e).__name__}: {_first_line(e)})")
    return problems


def run_tasks(model, tokenizer, selection: TaskSelection, *, limit: int | None, batch_size: int,
              samples: bool = False) -> dict[str, Any]:
    """lm-eval's results for `model` (an instance: the caller decides what it is and where it lives) on the selection:
    lm-eval's own results dict (JSON-safe), with its per-example `samples` only when asked."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(selection.names), task_manager=selection.task_manager(), limit=limit,
                                  bootstrap_iters=0, log_samples=samples, verbosity="ERROR")
    if out is None:
        raise HarnessError("lm-eval returned no results")
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
            "lm_eval_version", "transformers_version", "date") + (("samples",) if samples else ())
    return json.loads(json.dumps({k: out[k] for k in keep if k in out}, default=str))


def metrics_of(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from lm-eval's results: its numeric metrics (`exact_match,none` → `exact_match`,
    another filter kept as `metric/filter`), without standard errors."""
    table: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        for key, value in row.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            table.setdefault(task, {})[metric if filt == "none" else f"{metric}/{filt}"] = float(value)
    return table


def generations(results: dict[str, Any], task: str) -> list[str]:
    """The model's completion of each example of `task`, in the task's order (needs `run_tasks(..., samples=True)`)."""
    rows = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in rows]
