"""`graft submit | status | logs | stop`: graftline jobs on a running Ray cluster, through its Jobs API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.submit import SubmitError

EXIT_SPEC = 2
EXIT_FAILED = 1
ADDRESS_HELP = "the cluster's dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)"


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"graft: error: {message}", file=sys.stderr)
    return code


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import submit as sub
    from pipelines.spec import SpecError

    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        return _fail(f"--working-dir: no such directory {args.working_dir!r}", EXIT_SPEC)
    try:
        spec, job_there, notes = sub.validate_for_cluster(Path(args.job), working_dir)
    except SpecError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return EXIT_SPEC
    for note in notes:
        print(f"graft: note: {note}", file=sys.stderr)
    try:
        env = sub.parse_env(args.env or ())
        client, url = sub.connect(args.address)
        sid = sub.submit(client, spec, job_there, working_dir, env=env, excludes=args.exclude or (),
                         force=args.force or (), python=args.python)
        print(sid, flush=True)
        print(f"graft: submitted job {spec.name!r} to {url}: follow with `graft logs {sid} --address {url} --follow`",
              file=sys.stderr)
        if not args.wait:
            return 0
        try:
            try:
                sub.follow(client, sid, _write)
            except SubmitError as e:  # no log stream (e.g. a proxy without websockets): poll the status instead
                print(f"graft: note: {e}; waiting without the log", file=sys.stderr)
            state, message = sub.wait(client, sid)
        except KeyboardInterrupt:
            return _fail(f"stopped waiting; job {sid} keeps running (`graft stop {sid} --address {url}`)", 130)
    except SubmitError as e:
        return _fail(str(e))
    if state != "SUCCEEDED":
        return _fail(f"job {sid} {state}" + (f": {message.strip().splitlines()[-1]}" if message.strip() else ""))
    print(f"{sid}: {state}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipelines import submit as sub

    try:
        client, _ = sub.connect(args.address)
        state, message = sub.status(client, args.id)
    except SubmitError as e:
        return _fail(str(e))
    print(f"{args.id}: {state}" + (f"  ({message.strip().splitlines()[-1]})" if message.strip() else ""))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from pipelines import submit as sub

    try:
        client, _ = sub.connect(args.address)
        if args.follow:
            sub.follow(client, args.id, _write)
        else:
            _write(sub.logs(client, args.id))
    except SubmitError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from pipelines import submit as sub

    try:
        client, _ = sub.connect(args.address)
        stopped = sub.stop(client, args.id)
    except SubmitError as e:
        return _fail(str(e))
    print(f"{args.id}: stop requested" if stopped else f"{args.id}: already ended")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit`, `status`, `logs` and `stop` to the `graft` command line."""
    s = subparsers.add_parser("submit", help="validate a job spec here, then run it on a Ray cluster through its Jobs API")
    s.add_argument("job", help="job YAML, e.g. jobs/demo.yaml")
    s.add_argument("--address", help=ADDRESS_HELP)
    s.add_argument("--wait", action="store_true", help="stream the job's log until it ends; exit 1 unless it SUCCEEDED")
    s.add_argument("--working-dir", default=".", help="the code shipped to the cluster (default: the current directory)")
    s.add_argument("--exclude", action="append", metavar="PATTERN", help="more .gitignore-style patterns not to ship")
    s.add_argument("--env", action="append", metavar="KEY=VALUE", help="environment variable for the job (repeatable); "
                   "MLFLOW_TRACKING_URI is passed when set")
    s.add_argument("--force", action="append", metavar="STAGE", help="passed to `graft run --force` on the cluster")
    s.add_argument("--python", default="python", help="the cluster's Python that runs the driver (default: python)")
    s.set_defaults(fn=cmd_submit)

    for name, fn, text in (("status", cmd_status, "status of a submitted job"),
                           ("logs", cmd_logs, "the driver log of a submitted job"),
                           ("stop", cmd_stop, "stop a submitted job")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("id", help="submission id printed by `graft submit`")
        p.add_argument("--address", help=ADDRESS_HELP)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        p.set_defaults(fn=fn)
