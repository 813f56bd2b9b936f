"""`graft sweep JOB.yaml`: a Ray Tune search over a job's `sweep:` section (see pipelines.sweep)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_SPEC = 2
EXIT_FAILED = 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipelines.cli import load_spec_or_report

    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    if spec.sweep is None:
        print(f"{args.job}: sweep: missing; `graft sweep` needs a `sweep:` section (see jobs/sweep-demo.yaml)", file=sys.stderr)
        return EXIT_SPEC
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipelines.sweep import run_sweep

    try:
        run_sweep(spec, Path(args.job), address=args.address, env_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    except KeyboardInterrupt:
        print("graft: error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user; the full error is in the FAILED MLflow run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"graft: error: {type(e).__name__}: {first}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sweep", help="search a job's `sweep:` params with Ray Tune; writes the best trial as a job YAML")
    s.add_argument("job", help="job YAML with a `sweep:` section, e.g. jobs/sweep-demo.yaml")
    s.add_argument("--address", help="existing Ray cluster: 'auto', 'ray://HOST:10001' or 'HOST:6379' (default: a private local Ray)")
    s.set_defaults(fn=cmd_sweep)
