"""`graft submit | status | logs | stop`: graftline jobs on a running Ray cluster, through its Jobs API.

`graft submit` prints its plan (the job, the cluster, the Python the head runs it with and why), probes the head,
then prints the submission id on stdout; `graft status ID` prints the job's status and its MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipelines.submit import CLUSTER_PYTHONS, SubmitError

EXIT_SPEC = 2
EXIT_FAILED = 1
ADDRESS_HELP = "the cluster's dashboard / Jobs API URL, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS)"


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"graft: error: {message}", file=sys.stderr)
    return code


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


# Ray's notes while it packages and uploads the working dir (what it leaves out, the package's name): kept off the
# console unless `graft -v`; graft prints its own plan.
PACKAGING_LOGGERS = ("ray._private.runtime_env.working_dir", "ray._private.runtime_env.packaging",
                     "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def cmd_submit(args: argparse.Namespace) -> int:
    from pipelines import submit as sub
    from pipelines.spec import SpecError

    if not getattr(args, "verbose", False):
        for name in PACKAGING_LOGGERS:
            logging.getLogger(name).addFilter(_errors_only)  # a filter: Ray sets these loggers' levels on import

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
        runtime = sub.choose_runtime(url, python=args.python, cluster=args.cluster, pip=args.pip, working_dir=working_dir)
        print(f"graft: plan: job {spec.name!r} ({job_there}) on {url}, code from {working_dir}", file=sys.stderr)
        print(f"graft: plan: {runtime.described()}", file=sys.stderr, flush=True)
        if args.no_probe:
            if runtime.python is None:
                return _fail("--no-probe: the head is not this machine, so its Python is unknown: pass --python PATH "
                             f"or --cluster NAME ({', '.join(sub.CLUSTER_PYTHONS)})", EXIT_SPEC)
        else:
            print("graft: probe: checking that the head can import graftline's stack (--no-probe skips this)",
                  file=sys.stderr, flush=True)
            python, seconds = sub.probe(client, url, runtime, working_dir, env, args.exclude or (), job_name=spec.name,
                                        timeout_s=args.probe_timeout)
            if runtime.python is None:
                runtime = sub.Runtime(python, f"{runtime.why.split(';')[0]}; the probe picked it")
            print(f"graft: probe: {python} on the head imports {', '.join(sub.PROBE_MODULES)} ({seconds:.1f} s)",
                  file=sys.stderr, flush=True)
        sid = sub.submit(client, spec, job_there, working_dir, env=env, excludes=args.exclude or (),
                         force=args.force or (), runtime=runtime)
        print(sid, flush=True)
        print(f"graft: submitted job {spec.name!r} to {url} with {runtime.described()}: follow with "
              f"`graft logs {sid} --address {url} --follow`", file=sys.stderr)
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
    """The job's status line, then where its MLflow run is (the tracking URI `graft submit` recorded, or --tracking-uri)."""
    from pipelines import submit as sub

    try:
        client, _ = sub.connect(args.address)
        state, message, meta = sub.job_info(client, args.id)
    except SubmitError as e:
        return _fail(str(e))
    print(f"{args.id}: {state}" + (f"  ({message.strip().splitlines()[-1]})" if message.strip() else ""), flush=True)
    uri = args.tracking_uri or meta.get(sub.META_TRACKING_URI)
    experiment = args.experiment or meta.get(sub.META_EXPERIMENT)
    if sub.META_JOB not in meta and not (args.tracking_uri and args.experiment):
        return 0  # not a graftline job (or one submitted before graftline recorded these): nothing to look up
    if not uri or not experiment:
        print("graft: note: MLflow: the job's tracking URI is not known here (the cluster's own MLFLOW_TRACKING_URI, or "
              "sqlite under a relative output_dir in the job's temporary copy of the working dir): pass --tracking-uri URI",
              file=sys.stderr)
        return 0
    try:
        print(f"MLflow: {sub.run_link(args.id, uri, experiment)}")
    except SubmitError as e:
        print(f"graft: note: {e}", file=sys.stderr)
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
    how = s.add_mutually_exclusive_group()
    how.add_argument("--python", metavar="PATH", help="the head's Python with graftline's stack installed: runs the driver "
                     "and, as the runtime_env's py_executable, every worker (default: auto; see --cluster)")
    how.add_argument("--cluster", metavar="NAME", help="the cluster is one of graftline's definitions in cluster/ "
                     f"({', '.join(CLUSTER_PYTHONS)}, or the file's path): use the Python it installs graftline into. Default: "
                     "the Python running this command for a head on this machine, else the first of those the probe finds")
    how.add_argument("--pip", action="store_true", help="run the job in a virtualenv Ray builds on the head from "
                     "graftline's requirements (pyproject.toml; minutes the first time, then cached on the head)")
    s.add_argument("--no-probe", action="store_true", help="skip the probe job that checks, before submitting, that the "
                   "head's Python imports torch, ray, deepspeed and graftline")
    s.add_argument("--probe-timeout", type=float, metavar="S", help="give up on the probe after S seconds (default: 120; "
                   "1800 with --pip, which installs the requirements first)")
    s.set_defaults(fn=cmd_submit)

    for name, fn, text in (("status", cmd_status, "status of a submitted job"),
                           ("logs", cmd_logs, "the driver log of a submitted job"),
                           ("stop", cmd_stop, "stop a submitted job")):
        p = subparsers.add_parser(name, help=text)
        p.add_argument("id", help="submission id printed by `graft submit`")
        p.add_argument("--address", help=ADDRESS_HELP)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
        if name == "status":
            p.add_argument("--tracking-uri", metavar="URI", help="MLflow store to find the job's run in (default: the one "
                           "`graft submit` recorded in the job's metadata)")
            p.add_argument("--experiment", help="MLflow experiment of the job (default: recorded likewise)")
        p.set_defaults(fn=fn)
