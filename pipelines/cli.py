"""The `graft` command line: run, validate and review graftline jobs."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

EXIT_SPEC = 2
EXIT_FAILED = 1
# Modules that add their own subcommands through `register(subparsers)`.
SUBCOMMAND_MODULES = ("pipelines.cli_submit", "pipelines.cli_sweep", "pipelines.cli_skillpack", "pipelines.cli_merge")


def _fail(message: str, code: int) -> int:
    print(f"graft: error: {message}", file=sys.stderr)
    return code


def load_spec_or_report(path: str):
    """The validated job spec, or None after printing one line per problem to stderr."""
    from pipelines.spec import SpecError, load_job

    try:
        return load_job(path)
    except SpecError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    print(f"{args.job}: ok (job {spec.name!r}, {len(spec.skills)} skills)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipelines.driver import run_job

    try:
        run_job(spec, Path(args.job), address=args.address, force=frozenset(args.force or ()),
                env_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # one line for the user; the full error is in the FAILED MLflow run
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return _fail(f"{type(e).__name__}: {first}", EXIT_FAILED)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import subprocess

    uri = args.uri
    if uri is None:
        from pipelines.driver import resolve_tracking_uri

        spec = load_spec_or_report(args.job)
        if spec is None:
            return EXIT_SPEC
        uri = resolve_tracking_uri(spec, os.environ.get("MLFLOW_TRACKING_URI"))
    print(f"MLflow UI for {uri} on http://127.0.0.1:{args.port}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(cmd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="graftline: train, score, pack and graft skills between LLMs")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job spec end to end")
    r.add_argument("job", help="job YAML, e.g. jobs/demo.yaml")
    r.add_argument("--address",
                   help="existing Ray cluster: 'auto', 'ray://HOST:10001' or 'HOST:6379' (default: a private local Ray)")
    r.add_argument("--force", action="append", metavar="STAGE",
                   help="rerun STAGE even when its outputs are complete ('all' for every stage)")
    r.set_defaults(fn=cmd_run)

    v = sub.add_parser("validate", help="check a job spec without running it")
    v.add_argument("job")
    v.set_defaults(fn=cmd_validate)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a job's tracking store")
    u.add_argument("job", nargs="?", default="jobs/demo.yaml")
    u.add_argument("--uri", help="tracking URI (default: the job's)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(fn=cmd_ui)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
