"""Stage `evolve`: evolutionary DARE-TIES, the merge study's searched merge (methods.md §4).

Reads `Base`, `Datasets`, `Experts`, `Merged`; writes `Merged` (the static merges plus `evolved_dare_ties`); uses
the `merge_study` and `evaluate` sections.

A Ray Tune search (Tune's OptunaSearch over the sampler `merge_study.evolve.search` names: CMA-ES by default)
over each expert's DARE-TIES weight and density. A trial merges the two experts with its values into a scratch
folder, scores the merge on the dev rows — the first `merge_study.dev_examples` rows of each measured skill's
training split, disjoint from the held-out rows the study reports — and reports their mean accuracy; every trial
is an MLflow child run of the stage's run. The best trial's config is merged once more into the output.
Output: `<root>/evolve/evolved_dare_ties-<key>/` with `model/` (the checkpoint), `merge.yaml` (its config, the
one to reuse with `graft merge`), `trials.json` and `trials.png` (the objective by trial, and the best so far).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import Base, Checkpoint, Datasets, Experts, Merged
from pipelines.cache import Ref, content_key
from pipelines.placement import Placement, placement
from pipelines.context import RunContext, StageResult
from pipelines.spec import EvaluateSpec, EvolveSpec
from pipelines.merging import measured_skills, merge_config, write_merge
from pipelines.tracking import RunHandle, Tracker

NAME = "evolve"
READS = (Base, Datasets, Experts, Merged)
WRITES = (Merged,)
SECTIONS = ("merge_study", "evaluate")
ROW = "evolved_dare_ties"
METHOD = "dare_ties"
OBJECTIVE = "dev_mean"


@dataclass(frozen=True)
class EvolveRequest:
    """Everything the evolved merge depends on; its content key is the hash of all of it."""

    base: Ref
    tokenizer: Ref
    language: Ref
    domain: Ref
    dev: tuple[tuple[str, Ref], ...]
    evolve: EvolveSpec
    dev_examples: int
    evaluate: EvaluateSpec
    dtype: str
    seed: int
    placement: Placement  # where a trial scores its merge


@dataclass(frozen=True)
class TrialSetup:
    """What every trial process needs: the request, and where its MLflow run goes."""

    request: EvolveRequest
    tracking_uri: str
    experiment: str
    job: str
    parent_run_id: str
    scratch: str


def trial_config(req: EvolveRequest, params: dict[str, float]) -> dict[str, Any]:
    """The DARE-TIES merge config of one point of the search."""
    language = {"weight": params["language_weight"], "density": params["language_density"]}
    domain = {"weight": params["domain_weight"], "density": params["domain_density"]}
    return merge_config(METHOD, req.base.path, (req.language.path, language), (req.domain.path, domain), {}, req.dtype, req.tokenizer.path)


def dev_scores(folder: Path, req: EvolveRequest) -> dict[str, float]:
    """Exact match of the checkpoint at `folder` on each measured skill's dev rows."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.evaluation import exact_match
    from graft.lora import load_with_adapter

    model = load_with_adapter(str(folder), None, options=req.placement.load_options(False))
    tok = AutoTokenizer.from_pretrained(req.tokenizer.path)
    ev = req.evaluate
    return {skill: exact_match(model, tok, read_jsonl(rows.path)[:req.dev_examples], ev.max_new_tokens, ev.batch_size)
            for skill, rows in req.dev}


def evolve_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """One Tune trial: merge at its point, score on the dev rows, report the mean (in its own MLflow child run)."""
    from ray import tune

    req = setup.request
    req.placement.enter()
    params = {k: float(v) for k, v in config.items()}
    tracker = Tracker(setup.tracking_uri, setup.experiment, job=setup.job)
    trial = tune.get_context().get_trial_name()
    with tracker.run(f"{NAME}/{trial}", parent=RunHandle(tracker.client, setup.parent_run_id),
                     tags={"graftline.stage": NAME, "graftline.evolve_trial": trial}) as run:
        run.params(params)
        with tempfile.TemporaryDirectory(prefix="graftline-evolve-", dir=setup.scratch) as tmp:
            write_merge(trial_config(req, params), tmp, req.seed)
            scores = dev_scores(Path(tmp) / "model", req)
        value = sum(scores.values()) / len(scores)
        run.metrics({OBJECTIVE: value, **{f"dev.{s}": v for s, v in scores.items()}})
        tune.report({OBJECTIVE: value, **{f"dev.{s}": v for s, v in scores.items()}, "mlflow_run_id": run.run_id})


def search(setup: TrialSetup, out: Path) -> list[dict[str, Any]]:
    """Run the Tune search; every trial's params and scores, in the order they ran."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.merge_search import SAMPLERS

    ev = setup.request.evolve
    space = {f"{who}_{what}": tune.uniform(*getattr(ev, what)) for who in ("language", "domain") for what in ("weight", "density")}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(evolve_trial, setup=setup),
                            {"cpu": setup.request.placement.threads, "gpu": setup.request.placement.num_gpus}),
        param_space=space,
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="max", num_samples=ev.trials, max_concurrent_trials=ev.max_concurrent,
                                    search_alg=OptunaSearch(sampler=SAMPLERS.get(ev.search)(setup.request.seed))),
        run_config=tune.RunConfig(name="tune", storage_path=str(out), verbose=0),
    )
    grid = tuner.fit()
    trials = []
    for result in grid:
        if result.error:
            raise RuntimeError(f"evolve trial failed: {str(result.error).strip().splitlines()[-1]}")
        m = result.metrics
        trials.append({"params": {k: float(v) for k, v in result.config.items()}, OBJECTIVE: m[OBJECTIVE],
                       "dev": {k.removeprefix("dev."): v for k, v in m.items() if k.startswith("dev.")},
                       "mlflow_run_id": m.get("mlflow_run_id", ""), "started": m.get("timestamp", 0)})
    trials.sort(key=lambda t: t["started"])
    return trials


def trials_chart(trials: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Each trial's dev mean in the order it ran, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [t[OBJECTIVE] for t in trials]
    best = [max(values[: i + 1]) for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(values) + 1), values, "o", label="trial")
    ax.plot(range(1, len(values) + 1), best, "-", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("dev mean exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(ctx: RunContext) -> StageResult:
    spec, ms = ctx.spec, ctx.spec.merge_study
    base, data, experts, merged = ctx.board.get(Base), ctx.board.get(Datasets), ctx.board.get(Experts), ctx.board.get(Merged)
    result = StageResult(NAME)
    if ms.evolve.trials == 0:
        result.artifacts.append(merged)
        return result
    req = EvolveRequest(base.model, base.tokenizer, experts[ms.language], experts[ms.domain],
                        tuple((s, data[s].train) for s in measured_skills(spec)), ms.evolve, ms.dev_examples, spec.evaluate,
                        ms.dtype, spec.seed, placement(spec))

    def build(tmp: Path, run: RunHandle) -> dict[str, float]:
        setup = TrialSetup(req, ctx.tracker.uri, spec.tracking.experiment, spec.name, run.run_id, str(tmp))
        ctx.log(f"  {NAME}: {ms.evolve.trials} trials of {METHOD} ({ms.evolve.search}), scored on {ms.dev_examples} dev rows "
                f"of {', '.join(s for s, _ in req.dev)}")
        trials = search(setup, tmp)
        best = max(trials, key=lambda t: t[OBJECTIVE])
        write_merge(trial_config(req, best["params"]), str(tmp), req.seed)
        (tmp / "trials.json").write_text(json.dumps({"objective": OBJECTIVE, "best": best, "trials": trials}, indent=1))
        trials_chart(trials, tmp / "trials.png", f"{spec.name}: evolutionary {METHOD} ({ms.evolve.search})")
        for name in ("trials.json", "trials.png", "merge.yaml"):
            run.artifact(tmp / name, NAME)
        return {f"best.{OBJECTIVE}": best[OBJECTIVE], **{f"best.{k}": v for k, v in best["params"].items()}}

    key = content_key(req)
    out = ctx.run_item(NAME, ROW, key, {"trials": ms.evolve.trials, "search": ms.evolve.search, "dev_examples": ms.dev_examples}, build,
                       result)
    result.artifacts.append(Merged({**merged.by_name, ROW: Checkpoint(Ref(str(out / "model"), key), base.tokenizer)}))
    return result
