"""Where a committed result came from: the commit (and whether the tree was dirty), the command, the seeds, the time.

Every results JSON carries this block under "provenance", so a reader can tell which code produced
a number and rerun exactly what produced it.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


def provenance(seeds: list[int], started: float, argv: list[str] | None = None) -> dict:
    """The provenance block of a result produced by this process, started at `started` (time.time())."""
    argv = sys.argv if argv is None else argv
    script = Path(argv[0]).resolve()
    rel = script.relative_to(REPO) if REPO in script.parents else script
    return {
        "commit": _git("rev-parse", "HEAD"),
        # results another benchmark just wrote are not code: only a changed tracked file elsewhere makes the run dirty
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks/results")),
        "command": " ".join(["python", str(rel), *map(shlex.quote, argv[1:])]),
        "seeds": seeds,
        "wall_seconds": round(time.time() - started, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
