"""Every committed benchmark result says where it came from, is indexed, and is shown as it is.

- each `benchmarks/results/*.json` carries a provenance block (`benchmarks/provenance.py`): a commit this
  repository has, a clean tree, a `python benchmarks/<script>.py …` command whose script exists, its seeds and
  its wall time;
- each PNG there belongs to a JSON of the same stem;
- each JSON is named in the results table of `benchmarks/README.md`;
- `benchmarks/results/REPORT.md` is exactly what `benchmarks/report.py` renders from them now.
One test per file, so a failure names the result. Fast: reads files, runs `git cat-file` at most once a result.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
RESULTS = BENCHMARKS / "results"
README = BENCHMARKS / "README.md"
JSONS = sorted(RESULTS.glob("*.json"), key=lambda p: p.name)
PNGS = sorted(RESULTS.glob("*.png"), key=lambda p: p.name)
COMMIT = re.compile(r"[0-9a-f]{40}")


def load_report() -> ModuleType:
    """benchmarks/report.py as a module (benchmarks/ is not a package), loaded once."""
    name = "benchmarks_report"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "report.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclass looks its module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def provenance_problems(name: str, data: object, repo: Path = REPO) -> list[str]:
    """What is wrong with the provenance block of result `name` (its parsed JSON `data`), one message a key;
    the commit is checked for its form here, for its presence in the repository by `commit_problem`."""
    if not isinstance(data, dict) or not isinstance(data.get("provenance"), dict):
        return [f"{name}: no 'provenance' block (regenerate it with its benchmark script, or delete it)"]
    prov = data["provenance"]
    problems = []
    commit = prov.get("commit")
    if not (isinstance(commit, str) and COMMIT.fullmatch(commit)):
        problems.append(f"{name}: provenance.commit is {commit!r}, not 40 hex characters")
    if prov.get("dirty") is not False:
        problems.append(f"{name}: provenance.dirty is {prov.get('dirty')!r}: the result came from uncommitted code")
    command = prov.get("command")
    words = shlex.split(command) if isinstance(command, str) else []
    if not (isinstance(command, str) and command.startswith("python benchmarks/") and len(words) > 1):
        problems.append(f"{name}: provenance.command is {command!r}, not 'python benchmarks/<script>.py ...'")
    elif not (words[1].endswith(".py") and (repo / words[1]).is_file()):
        problems.append(f"{name}: provenance.command runs {words[1]!r}, which is not a script in the repository")
    seeds = prov.get("seeds")
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        problems.append(f"{name}: provenance.seeds is {seeds!r}, not a non-empty list of ints")
    wall = prov.get("wall_seconds")
    if not (_is_number(wall) and wall > 0):
        problems.append(f"{name}: provenance.wall_seconds is {wall!r}, not a positive number")
    return problems


def commit_problem(name: str, commit: str, repo: Path = REPO) -> str | None:
    """Why `commit` is not a commit of the repository at `repo`, or None when it is."""
    found = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo, capture_output=True, text=True)
    if found.returncode != 0:
        return f"{name}: provenance.commit {commit} is not a commit of this repository ({found.stderr.strip()})"
    return None


def readme_names(readme: Path = README) -> set[str]:
    """The file names in backticks on the table rows of the benchmarks README."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    return {n for line in text.splitlines() if line.startswith("|") for n in re.findall(r"`([^`]+)`", line)}


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_result_has_provenance(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    problems = provenance_problems(path.name, data)
    assert not problems, "\n".join(problems)
    if not (REPO / ".git").exists() or shutil.which("git") is None:
        pytest.skip("no git repository here (e.g. an sdist): provenance.commit not looked up")
    problem = commit_problem(path.name, data["provenance"]["commit"])
    assert problem is None, problem


@pytest.mark.parametrize("path", PNGS, ids=lambda p: p.name)
def test_figure_has_its_result(path: Path) -> None:
    assert path.with_suffix(".json").is_file(), f"{path.name}: no {path.stem}.json beside it (a figure without its numbers)"


@pytest.mark.parametrize("path", JSONS, ids=lambda p: p.name)
def test_result_is_indexed(path: Path) -> None:
    assert path.name in readme_names(), f"{path.name}: not named (as `{path.name}`) in the table of benchmarks/README.md"


def test_report_is_current() -> None:
    report = RESULTS / "REPORT.md"
    assert report.is_file(), "benchmarks/results/REPORT.md is missing: run `python benchmarks/report.py`"
    assert report.read_text(encoding="utf-8") == load_report().render(RESULTS), (
        "benchmarks/results/REPORT.md is stale: run `python benchmarks/report.py`")


def test_checks_catch_a_bad_result(tmp_path: Path) -> None:
    """The checks above fail where they should: on each bad key, an unknown commit, an unindexed result, and the
    report marks a result without provenance."""
    good = {"commit": "0" * 40, "dirty": False, "command": "python benchmarks/report.py", "seeds": [0], "wall_seconds": 1.0}
    assert provenance_problems("good.json", {"provenance": good}) == []
    assert provenance_problems("none.json", {"rows": []}) == ["none.json: no 'provenance' block (regenerate it with its "
                                                              "benchmark script, or delete it)"]
    bad = {"commit": "abc", "dirty": True, "command": "python benchmarks/nope.py", "seeds": [], "wall_seconds": 0}
    problems = provenance_problems("bad.json", {"provenance": bad})
    for key in ("commit", "dirty", "command", "seeds", "wall_seconds"):
        assert any(p.startswith(f"bad.json: provenance.{key} ") for p in problems), (key, problems)
    assert provenance_problems("cmd.json", {"provenance": {**good, "command": "bash run.sh"}})
    assert provenance_problems("seeds.json", {"provenance": {**good, "seeds": [True]}})
    if (REPO / ".git").exists() and shutil.which("git") is not None:
        assert commit_problem("bad.json", "0" * 40) is not None
    readme = tmp_path / "README.md"
    readme.write_text("| script | result |\n|---|---|\n| `a.py` | `a.json` |\nprose naming `b.json`\n")
    assert readme_names(readme) == {"a.py", "a.json"}
    (tmp_path / "old.json").write_text(json.dumps({"accuracy": 0.5}))
    assert "no provenance: not a claim of main" in load_report().render(tmp_path)
