"""The `graft` command line: run, validate and review graftline jobs."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.plan import Node

EXIT_SPEC = 2
EXIT_FAILED = 1
# Modules that add their own subcommands through `register(subparsers)`.
SUBCOMMAND_MODULES = ("pipelines.cli_submit", "pipelines.cli_sweep", "pipelines.cli_skillpack", "pipelines.cli_merge",
                      "pipelines.cli_transplant", "pipelines.cli_harness")


def _fail(message: str, code: int) -> int:
    print(f"graft: error: {message}", file=sys.stderr)
    return code


def one_line(e: BaseException) -> str:
    """An exception as one line: a refusal (ValueError, graftline's own included) by its message, others prefixed by their type."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else "failed"
    if first.endswith(":") and len(lines) > 1:  # a header over details (a worker's traceback): its last line is the cause
        first = f"{first} {lines[-1]}"
    return first if isinstance(e, ValueError) else f"{type(e).__name__}: {first}"


def input_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises while graftline loads and checks it: each is refused with one line and exit 2.

    ValueError covers graftline's own refusals (artifacts, checkpoints, outputs, specs); the rest come
    from reading files (OSError, safetensors' SafetensorError, KeyError) or from torch/transformers
    refusing what they were handed (RuntimeError).
    """
    from safetensors import SafetensorError

    return ValueError, KeyError, OSError, RuntimeError, SafetensorError


def digest_cache():
    """The tensor-digest cache of this user (`$XDG_CACHE_HOME/graftline/digests`, default ~/.cache)."""
    from graft.fingerprint import DigestCache

    return DigestCache(Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "graftline" / "digests")


def load_spec_or_report(path: str):
    """The validated job spec, or None after printing one line per problem to stderr."""
    from pipelines.recipes import check_job
    from pipelines.spec import SpecError, load_job

    try:
        spec = load_job(path)
        check_job(spec, path)
        return spec
    except SpecError as e:
        for line in e.lines:
            print(line, file=sys.stderr)
        return None


def cmd_validate(args: argparse.Namespace) -> int:
    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    from pipelines.recipes import recipe_of

    recipe = recipe_of(spec.recipe)
    print(f"{args.job}: ok (job {spec.name!r}, {len(spec.skills)} skills, recipe {recipe.name!r}: {' → '.join(recipe.stages)})")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from pipelines.recipes import RECIPES, describe

    print("\n\n".join(describe(RECIPES.get(name)) for name in RECIPES.names()))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from pipelines.driver import run_job
    from pipelines.plan import PlanError

    try:
        run_job(spec, Path(args.job), address=args.address, force=frozenset(args.force or ()),
                env_tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"), node=node_from_args(args),
                submission_id=args.submission_id)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except PlanError as e:  # a stage that cannot fit the largest node: refused before anything ran
        if args.debug:
            raise
        return _fail(str(e), EXIT_SPEC)
    except Exception as e:  # one line for the user; the full error is in the FAILED MLflow run
        if args.debug:
            raise
        return _fail(one_line(e), EXIT_FAILED)
    return 0


def _at_least(low: float, kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"expected at least {low:g}, got {text!r}")
        return value

    return parse


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """The options describing the cluster's largest node, which `graft plan` and `graft run` check every stage against."""
    g = p.add_argument_group("the cluster's largest node (default: this machine; with no GPU visible, 8 GPUs of 80 GB)")
    g.add_argument("--node-gpus", type=_at_least(0, int), metavar="N", help="GPUs on the largest node")
    g.add_argument("--node-gpu-gb", type=_at_least(0.001, float), metavar="GB", help="memory of each of its GPUs (GB = 10^9 bytes)")
    g.add_argument("--node-ram-gb", type=_at_least(0.001, float), metavar="GB", help="its RAM (default: this machine's)")
    g.add_argument("--node-cpus", type=_at_least(1, int), metavar="N", help="its CPU cores (default: this machine's)")


def node_from_args(args: argparse.Namespace) -> Node:
    """The largest node: each option given, the rest from this machine (`pipelines.plan.local_node`)."""
    from dataclasses import replace

    from pipelines.plan import local_node

    given = {"gpus": args.node_gpus, "gpu_gb": args.node_gpu_gb, "ram_gb": args.node_ram_gb, "cpus": args.node_cpus}
    return replace(local_node(), **{k: v for k, v in given.items() if v is not None})


def cmd_plan(args: argparse.Namespace) -> int:
    spec = load_spec_or_report(args.job)
    if spec is None:
        return EXIT_SPEC
    from pipelines.plan import format_plan, plan_job, refusal

    plan = plan_job(spec, node_from_args(args))
    print(format_plan(plan, args.job))
    line = refusal(plan, args.job)
    return _fail(line, EXIT_SPEC) if line else 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Start the MLflow UI on a job's tracking store and say which experiment to open, its runs in pipeline order."""
    import subprocess

    from mlflow import MlflowClient

    from pipelines.driver import resolve_tracking_uri
    from pipelines.tracking import ui_link

    base = f"http://127.0.0.1:{args.port}"
    spec = None
    if args.uri is None or Path(args.job).is_file():  # with --uri, the job only names the experiment to point at
        spec = load_spec_or_report(args.job)
        if spec is None:
            return EXIT_SPEC
    uri = args.uri or resolve_tracking_uri(spec, os.environ.get("MLFLOW_TRACKING_URI"))
    if spec is None:
        print(f"MLflow UI for {uri} on {base}")
    else:
        name = spec.tracking.experiment
        try:
            experiment = MlflowClient(uri).get_experiment_by_name(name)
        except Exception as e:  # noqa: BLE001 - an unreachable or unreadable store is one line
            return _fail(f"MLflow at {uri}: {one_line(e)}", 1)
        if experiment is None:
            print(f"MLflow UI for {uri} on {base}: no experiment {name!r} yet (`graft run {args.job}` makes it)")
        else:
            print(f"MLflow UI for {uri}: open experiment {name!r}, its runs in pipeline order, at\n"
                  f"  {ui_link(base, experiment.experiment_id)}")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(args.port)]
    return subprocess.call(cmd)


def _show_graftline_notes() -> None:
    """graftline's own notes (logger `graftline`, e.g. a swept leftover) on stderr; other libraries' logging untouched."""
    log = logging.getLogger("graftline")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("graft: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class _AtLeast(logging.Filter):
    """Lets a logger's records through from `level` up."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


# loggers whose notices a user need not read on every run (their errors still show); filters, not levels, because
# DeepSpeed sets its logger's level when it is first imported, which may be later
# (a logger's filter sees only its own records, not its children's: each is named exactly)
QUIETED_LOGGERS = ("DeepSpeed", "ray._private.authentication.authentication_token_setup", "mlflow.store.db.utils")


def _quiet_libraries() -> None:
    """Without -v: no Hugging Face progress bars or advice, no DeepSpeed accelerator notice, no Ray token-auth notice,
    no MLflow database set-up notes, no libraries' FutureWarnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    for name in QUIETED_LOGGERS:
        logging.getLogger(name).addFilter(_AtLeast(logging.ERROR))
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="graft", description="graftline: train, score, pack and graft skills between LLMs")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error instead of one line")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also show other libraries' notices and progress bars (Hugging Face, DeepSpeed, Ray)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a job spec end to end")
    r.add_argument("job", help="job YAML, e.g. jobs/demo.yaml")
    r.add_argument("--address",
                   help="existing Ray cluster: 'auto', 'ray://HOST:10001' or 'HOST:6379' (default: a private local Ray)")
    r.add_argument("--force", action="append", metavar="STAGE",
                   help="rerun STAGE even when its outputs are complete ('all' for every stage)")
    r.add_argument("--submission-id", metavar="ID", help="the Ray Jobs submission running this driver (`graft submit` "
                   "passes it): tagged graftline.ray_submission_id on the job's MLflow run, where `graft status ID` finds it")
    add_node_arguments(r)
    r.set_defaults(fn=cmd_run)

    pl = sub.add_parser("plan", help="per stage: what it asks Ray for and each worker's peak memory; refused when a stage "
                                     "cannot fit the largest node (`graft run` checks the same first)")
    pl.add_argument("job", help="job YAML, e.g. jobs/demo.yaml")
    add_node_arguments(pl)
    pl.set_defaults(fn=cmd_plan)

    v = sub.add_parser("validate", help="check a job spec without running it")
    v.add_argument("job")
    v.set_defaults(fn=cmd_validate)

    rc = sub.add_parser("recipes", help="list the recipes a job can pick (`recipe:`), with each stage's artifacts")
    rc.set_defaults(fn=cmd_recipes)

    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 for a job's tracking store")
    u.add_argument("job", nargs="?", default="jobs/demo.yaml")
    u.add_argument("--uri", help="tracking URI (default: the job's)")
    u.add_argument("--port", type=int, default=5000)
    u.set_defaults(fn=cmd_ui)

    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one `graft` command: bad input is one line on stderr and exit 2, a failure one line and exit 1.

    As the process's own command (no `argv`), a command registered with `exit_at_once` (`graft merge`)
    ends the process as soon as it is done, output flushed, instead of returning: the interpreter's
    teardown of torch alone takes about a second on this project's CPU machines (measured: 2.6 s for
    `import torch` and a normal exit against 1.6 s with an immediate one), and such a command leaves
    nothing behind that needs it.
    """
    args = build_parser().parse_args(argv)
    code = _run(args)
    if argv is None and getattr(args, "exit_at_once", False):
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    _show_graftline_notes()
    if not args.verbose:
        _quiet_libraries()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, input_errors()):
            return _fail(one_line(e), EXIT_SPEC)
        return _fail(f"{one_line(e)} (graft --debug {args.command} ... shows where)", EXIT_FAILED)


if __name__ == "__main__":
    sys.exit(main())
