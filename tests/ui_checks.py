"""What a job's runs look like in the real MLflow UI, checked in headless Chromium.

A graftline job is one parent run with a child run per stage × item; MLflow's runs table, run pages and artifact
viewer are where a user reads it. These checks open the UI as a user would and look at what it rendered (table rows,
a drawn plot line, grid cells), because the tracking API can be right while the UI shows something else:
- `runs_order`: the runs table at a URL, top to bottom, with the job's parent expanded where the table nests;
  `in_pipeline_order` judges it against the recipe's stages (the parent's `graftline.stages` tag);
- `loss_chart`: a train run's `train_loss` chart on its Model metrics tab, drawn;
- `eval_table`: the `eval_table.json` table artifact (`MlflowClient.log_table`) on the run's Artifacts tab, as a grid.

Shared by `tests/test_ui_browser.py` and `benchmarks/ux.py`. Needs the `playwright` package (`pip install -e .[ui]`)
driving a Chromium binary (Debian's `chromium` at /usr/bin/chromium, or $CHROMIUM): no browser is downloaded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# MLflow 3.17 on two busy cores: a page can take many seconds to render
PAGE_TIMEOUT_S = 120.0
VIEWPORT = {"width": 1600, "height": 1400}
RUN_NAME_CELL = '[col-id="attributes.`Run Name`"]'
EXPAND_BUTTON = 'button[data-component-id*="runnamecellrenderer"]'
# MLflow 3.17 opens its assistant's chat panel on a first visit, over a quarter of the page; closed, as a user would
ASSISTANT_CLOSED = ("localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
                    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');")


def missing_browser() -> str | None:
    """Why the browser checks cannot run here (no playwright package, no Chromium binary), or None when they can."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (`make test-ui` installs it: pip install -e .[ui])"
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (`make test-ui` installs Debian's: apt-get install -y chromium)"
    return None


@contextmanager
def mlflow_server(store: Path, workdir: Path, timeout: float = 180.0) -> Iterator[str]:
    """`mlflow server` on a free loopback port against the sqlite store `store`; yields its base URL.

    The runs' artifacts are local files, which the server reads itself. It runs in its own process group, in
    `workdir` (where it may write), and that group is stopped on the way out."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "mlflow-server.log", "w")  # noqa: SIM115 - closed with the server
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store.resolve()}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{(workdir / 'mlflow-server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"mlflow server on {url} did not answer /health in {timeout:.0f} s")
            time.sleep(1)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (the system binary, driven by Playwright); yields the Browser."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def fresh_page(browser: Any) -> Iterator[Any]:
    """A page in a context of its own: the UI keeps sort and expansion state in local storage, which must not carry
    over from one check to the next. The assistant's chat panel starts closed."""
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    context.add_init_script(ASSISTANT_CLOSED)
    try:
        yield context.new_page()
    finally:
        context.close()


@dataclass
class Shot:
    """A screenshot and what it shows."""

    path: Path
    shows: str

    def as_json(self) -> dict[str, str]:
        """As a result JSON lists it: {"path", "shows"}."""
        return {"path": str(self.path), "shows": self.shows}


@dataclass
class Check:
    """One UI check: whether it passed, what was seen, and the screenshot taken."""

    ok: bool
    seen: dict[str, Any] = field(default_factory=dict)
    shot: Shot | None = None


def _screenshot(page: Any, folder: Path | None, name: str, shows: str) -> Shot | None:
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return Shot(path, shows)


# ------------------------------------------------------------------------------------------ the runs table


def runs_link(base_url: str, experiment_id: str, query: str | None = None) -> str:
    """The runs table of an experiment, with the URL query `query` (the UI's own sort and view parameters)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs" + (f"?{query}" if query else "")


def listed_runs(page: Any) -> list[str]:
    """Run ids of the runs table's rendered rows, top to bottom."""
    rows = page.eval_on_selector_all(
        "[role=row][row-id]", "rows => rows.map(r => [r.getAttribute('row-id'), Number(r.getAttribute('row-index'))])")
    index = dict(rows)  # a row's pinned and scrolling halves carry the same id and index
    return sorted(index, key=index.__getitem__)


def _wait_for(predicate, timeout: float = PAGE_TIMEOUT_S, every: float = 0.5) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def runs_order(page: Any, url: str, parent_id: str, child_ids: Sequence[str], shots: Path | None = None,
               name: str = "runs", shows: str = "") -> Check:
    """The runs table at `url`: the run ids it lists top to bottom once the job's parent is there, after expanding the
    parent when the table nests its children under it (a `+` beside it) and they are not shown yet.

    `seen`: `listed` (run ids, top to bottom), `nested` (whether the parent had an expander), `expanded` (whether it
    was clicked open). `ok` is only whether every run of the job was listed; `in_pipeline_order` judges the order."""
    page.goto(url)
    page.locator(f'[row-id="{parent_id}"] {RUN_NAME_CELL}').first.wait_for()
    job = {parent_id, *child_ids}
    expander = page.locator(f'[row-id="{parent_id}"] {EXPAND_BUTTON}')
    nested = expander.count() > 0
    expanded = False
    if nested and not set(child_ids) <= set(listed_runs(page)):
        expander.first.click()
        expanded = True
    complete = _wait_for(lambda: job <= set(listed_runs(page)))
    page.wait_for_timeout(500)  # the grid settles its row positions after the last rows arrive
    listed = listed_runs(page)
    shot = _screenshot(page, shots, name, shows or f"the runs table at {url}")
    return Check(complete, {"url": url, "listed": listed, "nested": nested, "expanded": expanded}, shot)


def in_pipeline_order(listed: Sequence[str], stage_of: dict[str, str], stages: Sequence[str]) -> tuple[bool, str]:
    """Whether the job's child runs (the ids in `stage_of`, each with its stage) are listed in `stages`' order, every one
    of them; other runs in `listed` (the parent, other jobs') are ignored. Returns (ok, why not)."""
    place = {s: i for i, s in enumerate(stages)}
    kids = [rid for rid in listed if rid in stage_of]
    missing = set(stage_of) - set(kids)
    if missing:
        return False, f"{len(missing)} of the job's {len(stage_of)} child runs not listed"
    order = [place.get(stage_of[rid], -1) for rid in kids]
    if -1 in order:
        return False, f"a child run of stage {stage_of[kids[order.index(-1)]]!r}, not in the recipe {list(stages)}"
    for (a, b), (ra, rb) in zip(zip(order, order[1:]), zip(kids, kids[1:])):
        if b < a:
            return False, f"{stage_of[rb]!r} run {rb} listed after {stage_of[ra]!r} run {ra}"
    return True, ""


# ------------------------------------------------------------------------------------------ a run's pages


def run_page(base_url: str, experiment_id: str, run_id: str, tab: str = "") -> str:
    """A run's page in the UI, on one of its tabs (`model-metrics`, `artifacts/PATH`) or its overview."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" + (f"/{tab}" if tab else "")


def loss_chart(page: Any, base_url: str, experiment_id: str, run_id: str, metric: str = "train_loss",
               shots: Path | None = None, name: str = "loss_chart", shows: str = "") -> Check:
    """The run's Model metrics tab shows a chart titled `metric` with a drawn line in its plot (a Plotly trace path
    through at least two points), not just a title."""
    page.goto(run_page(base_url, experiment_id, run_id, "model-metrics"))
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
        has=page.get_by_text(metric, exact=True)).first
    line = card.locator(".js-plotly-plot path.js-line").first
    try:
        line.wait_for()
        drawn = _wait_for(lambda: (line.get_attribute("d") or "").count("L") >= 1)
        vertices = (line.get_attribute("d") or "").count("L") + 1 if drawn else 0
    except Exception as e:  # noqa: BLE001 - a chart that never appears is a failed check, said with what was awaited
        shot = _screenshot(page, shots, name, shows or f"the {metric} chart of run {run_id} (missing)")
        return Check(False, {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}, shot)
    card.scroll_into_view_if_needed()
    shot = _screenshot(page, shots, name, shows or f"the {metric} chart of run {run_id}")
    return Check(drawn, {"vertices": vertices, "legend": card.inner_text().splitlines()[-1:]}, shot)


def eval_table(page: Any, base_url: str, experiment_id: str, run_id: str, models: Sequence[str], skills: Sequence[str],
               artifact: str = "eval_table.json", shots: Path | None = None, name: str = "eval_table",
               shows: str = "") -> Check:
    """The run's Artifacts tab, opened on the table artifact `artifact`, shows it as a grid: a `model` column holding
    every one of `models`, and a column for every one of `skills`."""
    page.goto(run_page(base_url, experiment_id, run_id, f"artifacts/{artifact}"))
    grid = page.locator("[role=table]").filter(has=page.locator('[role=columnheader] [title="model"]')).first
    try:
        grid.wait_for()
    except Exception as e:  # noqa: BLE001 - as in loss_chart
        shot = _screenshot(page, shots, name, shows or f"{artifact} of run {run_id} (no grid)")
        return Check(False, {"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}, shot)
    headers = [h.strip() for h in grid.locator("[role=columnheader]").all_inner_texts()]
    rows = [[c.strip() for c in r.locator("[role=cell]").all_inner_texts()] for r in grid.locator("[role=row]").all()]
    rows = [r for r in rows if r]
    col = headers.index("model")
    shown_models = [r[col] for r in rows if len(r) > col]
    ok = set(models) <= set(shown_models) and set(skills) <= set(headers)
    shot = _screenshot(page, shots, name, shows or f"{artifact} of run {run_id} as a grid")
    return Check(ok, {"columns": headers, "models": shown_models}, shot)


def job_runs(client: Any, experiment_id: str, job: str) -> tuple[Any, list[Any]]:
    """The newest parent run named `job` in the experiment, and its child runs."""
    parents = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{job}'",
                                 order_by=["attributes.start_time DESC"], max_results=10)
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise LookupError(f"no parent run named {job!r} in experiment {experiment_id}")
    parent = parents[0]
    kids = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=1000)
    return parent, kids

