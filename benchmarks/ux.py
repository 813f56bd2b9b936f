"""UX: what a user sees of the demo job, on the console and in the MLflow UI, and whether `graft submit` works with no --python.

1. The console. The demo job (a copy of the spec writing under --output-dir, a new temporary folder by default, so it
   runs from nothing) runs as `graft run`; its stdout and stderr are read line by line, each line timestamped:
   - progress_lines_during_train: stdout lines between the train stage's header (`[2/6] train`) and the next header;
   - max_silence_s: the longest time without a new console line (stdout or stderr), from the start to the exit;
     max_silence_by_stage_s: the same within each stage, from its header to the next ("start": before the first);
   - summary_width: the widest line of the summary table printed at the end (characters).
2. The MLflow UI, with the checks tests/test_ui_browser.py makes (tests/ui_checks.py): `mlflow server` on the job's
   store, headless Chromium (Debian's, driven by Playwright: `pip install -e .[ui]`):
   - mlflow_children_in_order: at the link `graft ui` prints (`pipelines.tracking.ui_link`), every child run of the job is
     listed, in the order of the recipe's stages (the parent's `graftline.stages` tag);
   - loss_chart_in_ui: each train run's Model metrics tab draws its `train_loss` chart (a plotted line, not a title);
   - eval_table_in_ui: `eval_table.json` on the evaluate/report run and on the parent shows as a grid, every model
     (base, each expert, grafted) in its `model` column and a column per skill.
   Screenshots go to $UX_SCREENSHOTS (default OUTPUT_DIR/screenshots), never into the repository; "screenshots" lists
   each with what it shows. "notes" says what each check saw.
3. submit_default_python_ok: `graft submit --wait` of a tiny one-skill job, with no --python, to a two-node Ray on
   loopback (tests/test_submit_cluster.py's LocalCluster: token auth on, the head's PATH without this virtualenv):
   whether the job SUCCEEDED. ~3 min; --skip-submit records null, and why, in "notes".

    .venv/bin/python benchmarks/ux.py [--job jobs/demo.yaml] [--output-dir DIR] [--skip-submit] [--out benchmarks/results/ux.json]

Writes {"progress_lines_during_train", "max_silence_s", "max_silence_by_stage_s", "mlflow_children_in_order",
"eval_table_in_ui", "loss_chart_in_ui", "submit_default_python_ok", "summary_width", "notes", "screenshots", "provenance"}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import yaml  # noqa: E402

from benchmarks.provenance import provenance  # noqa: E402
from graft.strict_yaml import load_yaml  # noqa: E402
from tests import ui_checks  # noqa: E402

HEADER = re.compile(r"^\[(\d+)/(\d+)\] (\S+)$")


@dataclass(frozen=True)
class Line:
    """One console line: seconds since the command started, the stream it came on, its text."""

    t: float
    stream: str
    text: str


@dataclass(frozen=True)
class Console:
    """Everything a command printed, in arrival order, and when it exited."""

    lines: list[Line]
    exit_t: float
    returncode: int

    def stdout(self) -> list[Line]:
        return [ln for ln in self.lines if ln.stream == "stdout"]


def run_console(cmd: Sequence[str], cwd: Path, env: dict[str, str], echo: bool = True) -> Console:
    """Run `cmd`, reading its stdout and stderr line by line as a terminal would show them, each line timestamped."""
    lines: list[Line] = []
    lock = threading.Lock()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)

    def read(stream, name: str) -> None:
        for raw in stream:
            line = Line(time.monotonic() - t0, name, raw.rstrip("\n"))
            with lock:
                lines.append(line)
            if echo:
                print(f"  [{line.t:7.1f}s {name[3]}] {line.text}", flush=True)

    readers = [threading.Thread(target=read, args=(proc.stdout, "stdout")), threading.Thread(target=read, args=(proc.stderr, "stderr"))]
    for r in readers:
        r.start()
    returncode = proc.wait()
    exit_t = time.monotonic() - t0
    for r in readers:
        r.join()
    return Console(sorted(lines, key=lambda ln: ln.t), exit_t, returncode)


def headers(console: Console) -> list[tuple[int, str]]:
    """(index in stdout, stage name) of each stage header the driver printed (`[2/6] train`)."""
    return [(i, m.group(3)) for i, ln in enumerate(console.stdout()) if (m := HEADER.match(ln.text))]


def progress_lines(console: Console, stage: str = "train") -> int:
    """Stdout lines between `stage`'s header and the next header (or the end)."""
    heads = headers(console)
    at = [k for k, (_, name) in enumerate(heads) if name == stage]
    if not at:
        raise ValueError(f"no [i/n] {stage} header on stdout")
    start = heads[at[0]][0]
    end = heads[at[0] + 1][0] if at[0] + 1 < len(heads) else len(console.stdout())
    return end - start - 1


def silences(console: Console) -> tuple[float, dict[str, float], str]:
    """The longest gap between console lines (start and exit count as lines), the longest within each stage (from its
    header to the next header; "start" before the first), and the line the longest gap followed."""
    stdout = console.stdout()
    bounds = [("start", 0.0)] + [(name, stdout[i].t) for i, name in headers(console)] + [("", console.exit_t)]
    times = [0.0] + [ln.t for ln in console.lines] + [console.exit_t]
    by_stage: dict[str, float] = {}
    for (name, lo), (_, hi) in zip(bounds, bounds[1:]):
        inside = [lo] + [t for t in times if lo < t < hi] + [hi]
        by_stage[name] = round(max(b - a for a, b in zip(inside, inside[1:])), 1)
    gaps = [(b - a, i) for i, (a, b) in enumerate(zip(times, times[1:]))]
    longest, i = max(gaps)
    after = "the start" if i == 0 else repr(console.lines[i - 1].text[:160])
    return round(longest, 1), by_stage, f"{longest:.1f} s after {after}, at {times[i]:.1f} s"


def summary_width(console: Console, first_stage: str) -> tuple[int, list[str]]:
    """The widest line of the summary table printed after the last stage (the block that starts with the first stage's
    row, `testbed   123.4 s   reused 0/5 …`, up to the next blank line), and the table's lines."""
    stdout = console.stdout()
    last = headers(console)[-1][0]
    row = re.compile(rf"^{re.escape(first_stage)}\s+\d+\.\d s\s+reused ")
    start = next((i for i in range(last + 1, len(stdout)) if row.match(stdout[i].text)), None)
    if start is None:
        raise ValueError(f"no summary table (a {first_stage!r} row) after the last stage header")
    table = []
    for ln in stdout[start:]:
        if not ln.text.strip():
            break
        table.append(ln.text)
    return max(len(t) for t in table), table


def demo_copy(job: Path, output_dir: Path) -> tuple[Path, dict]:
    """The job spec, writing under `output_dir` and tracking into its sqlite default, written beside its runs."""
    spec = load_yaml(job.read_text())
    spec["output_dir"] = str(output_dir)
    spec.setdefault("tracking", {}).pop("uri", None)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / job.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path, spec


def console_metrics(job_path: Path) -> tuple[dict, dict]:
    """Run the job as `graft run` and measure its console; (fields of the result, notes)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"PYTHONUNBUFFERED": "1"}
    console = run_console([sys.executable, "-m", "pipelines.cli", "run", str(job_path)], REPO, env)
    if console.returncode != 0:
        tail = "\n".join(ln.text for ln in console.lines[-30:])
        raise SystemExit(f"graft run {job_path} exited {console.returncode}:\n{tail}")
    longest, by_stage, where = silences(console)
    stages = [name for _, name in headers(console)]
    width, table = summary_width(console, stages[0])
    fields = {"progress_lines_during_train": progress_lines(console), "max_silence_s": longest,
              "max_silence_by_stage_s": by_stage, "summary_width": width}
    notes = {"console": f"{len(console.stdout())} stdout and {len(console.lines) - len(console.stdout())} stderr lines "
                        f"in {console.exit_t:.0f} s; stages {', '.join(stages)}",
             "max_silence_s": where, "summary_table": table}
    return fields, notes


def ui_metrics(spec: dict, output_dir: Path, shots: Path) -> tuple[dict, dict, list[dict]]:
    """The browser checks on the finished job's runs; (fields of the result, notes, screenshots)."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import ui_link

    store = output_dir / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(spec["tracking"].get("experiment", "graftline")).experiment_id
    parent, kids = ui_checks.job_runs(client, experiment, spec["name"])
    pid, stage_of = parent.info.run_id, {k.info.run_id: k.data.tags["graftline.stage"] for k in kids}
    stages = parent.data.tags["graftline.stages"].split(",")
    skills = [s["name"] for s in spec["skills"]]
    models = ["base", *(f"expert-{s}" for s in skills), "grafted"]
    checks: dict[str, ui_checks.Check] = {}
    with ui_checks.mlflow_server(store, output_dir / "ui-server") as base, ui_checks.chromium() as browser:
        views = {"runs_link": (ui_link(base, experiment),
                               "the runs table at the link `graft ui` prints (oldest first, the job's parent run expanded)"),
                 "runs_default": (ui_checks.runs_link(base, experiment),
                                  "the runs table as the UI opens it by default (newest first), the parent expanded")}
        for name, (url, shows) in views.items():
            with ui_checks.fresh_page(browser) as page:
                checks[name] = ui_checks.runs_order(page, url, pid, list(stage_of), shots, name, shows)
        with ui_checks.fresh_page(browser) as page:
            for run in (k for k in kids if k.data.tags["graftline.stage"] == "train"):
                item = run.data.tags["graftline.item"]
                checks[f"loss_{item}"] = ui_checks.loss_chart(
                    page, base, experiment, run.info.run_id, shots=shots, name=f"loss_{item}",
                    shows=f"run `{run.info.run_name}`, Model metrics tab: its train_loss chart")
            for run in [*(k for k in kids if k.data.tags["graftline.stage"] == "evaluate"), parent]:
                name = "eval_table_parent" if run is parent else "eval_table_report"
                checks[name] = ui_checks.eval_table(
                    page, base, experiment, run.info.run_id, models, skills, shots=shots, name=name,
                    shows=f"run `{run.info.run_name}`, Artifacts tab: eval_table.json as a grid (models × skills)")
    order = {name: ui_checks.in_pipeline_order(checks[name].seen["listed"], stage_of, stages) if checks[name].ok
             else (False, "not every run of the job was listed") for name in views}
    losses = [c for n, c in checks.items() if n.startswith("loss_")]
    tables = [c for n, c in checks.items() if n.startswith("eval_table_")]
    fields = {"mlflow_children_in_order": order["runs_link"][0] and pid in checks["runs_link"].seen["listed"],
              "eval_table_in_ui": len(tables) == 2 and all(c.ok for c in tables),
              "loss_chart_in_ui": len(losses) == len(skills) and all(c.ok for c in losses)}
    notes = {f"order_{name}": ("in pipeline order" if ok else f"not in pipeline order: {why}")
             + f"; nested under the parent: {checks[name].seen['nested']}" for name, (ok, why) in order.items()}
    notes |= {name: c.seen for name, c in checks.items() if not name.startswith("runs_")}
    shots_out = [c.shot.as_json() for c in checks.values() if c.shot is not None]
    return fields, notes, shots_out


def submit_default_python(root: Path) -> tuple[bool, str]:
    """`graft submit --wait` with no --python, of a one-skill job on a tiny base, to a two-node Ray on loopback."""
    from tests.conftest import make_base
    from tests.test_submit_cluster import LocalCluster, tiny_job

    job = root / "job.yaml"
    root.mkdir(parents=True, exist_ok=True)
    job.write_text(yaml.safe_dump(tiny_job(root, make_base(root / "base"))))
    cluster = LocalCluster()
    try:
        cluster.start()
        proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "submit", str(job), "--address", cluster.url, "--wait"],
                              cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=1200)
    finally:
        cluster.stop()
    sid = proc.stdout.splitlines()[0].strip() if proc.stdout.strip() else "?"
    ok = proc.returncode == 0 and f"{sid}: SUCCEEDED" in proc.stdout
    plan = next((ln for ln in proc.stderr.splitlines() if "plan: python:" in ln), "no plan line")
    status = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"{sid}: ")), f"exit {proc.returncode}")
    return ok, f"{status}; {plan.strip()}" + ("" if ok else f"; stderr: {proc.stderr.strip()[-500:]}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", type=Path, default=REPO / "jobs" / "demo.yaml")
    ap.add_argument("--output-dir", type=Path, default=None, help="where the job runs (default: a new temporary folder)")
    ap.add_argument("--skip-submit", action="store_true", help="leave out `graft submit` to a local Ray (~3 min)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ux.json")
    args = ap.parse_args(argv)
    started = time.time()

    output_dir = (args.output_dir or Path(tempfile.mkdtemp(prefix="graftline-ux-"))).resolve()
    shots = Path(os.environ.get("UX_SCREENSHOTS") or output_dir / "screenshots").resolve()
    if shots == REPO or REPO in shots.parents:
        raise SystemExit(f"UX_SCREENSHOTS={shots} is inside the repository: screenshots are never committed")
    if (missing := ui_checks.missing_browser()) is not None:
        raise SystemExit(f"cannot check the UI: {missing}")
    print(f"ux: the job runs under {output_dir}; screenshots in {shots}", flush=True)

    job_path, spec = demo_copy(args.job, output_dir)
    fields, notes = console_metrics(job_path)
    ui_fields, ui_notes, screenshots = ui_metrics(spec, output_dir, shots)
    fields |= ui_fields
    notes |= ui_notes
    if args.skip_submit:
        fields["submit_default_python_ok"] = None
        notes["submit_default_python_ok"] = "not run: --skip-submit"
    else:
        ok, why = submit_default_python(output_dir / "submit")
        fields["submit_default_python_ok"] = ok
        notes["submit_default_python_ok"] = why

    order = ["progress_lines_during_train", "max_silence_s", "max_silence_by_stage_s", "mlflow_children_in_order",
             "eval_table_in_ui", "loss_chart_in_ui", "submit_default_python_ok", "summary_width"]
    result = {k: fields[k] for k in order} | {"notes": notes, "screenshots": screenshots,
                                              "provenance": provenance([int(spec.get("seed", 0))], started)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in order}, indent=1))
    print(f"{args.out}; screenshots: {len(screenshots)} in {shots}")


if __name__ == "__main__":
    main()
