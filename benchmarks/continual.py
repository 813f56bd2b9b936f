"""Continual grafting: four skills added one after another, and what each step does to the earlier ones.

Variants, all from the same experts of `jobs/testbed.yaml` and the SkillPacks its pack stage made:
- `additive`: base + Σ SkillPacks so far;
- `protected`: importance-protected fusion (each new pack zeroed on the top `--protect` share of the
  base's and earlier skills' Fisher importance);
- `routed`: a RoutedModel over the packs so far, its router trained on the skills' training prompts
  plus general prompts (class "none");
- `routed_1_15`: the same over SkillPacks at most 1/15 of each bf16 delta (`SMALL`: 3 bits, GPTQ,
  Fisher-aware ranks, grids tuned to the expert, as in benchmarks/skillpack.py);
- `ties`: the merging baseline, TIES of the experts so far (density `--density`).
After each step every skill added so far (and `general`) is evaluated on its held-out set.
final_forgetting[skill] = 100 · (accuracy right after it was added − accuracy at the end), in points.

With several `--job`s (one testbed per seed) every variant runs on each, and the result keeps each final
accuracy as mean/min/max over the seeds, forgetting at its worst seed, and the target met only if it is met
on every seed.

Writes `benchmarks/results/continual.json`:
  {"machine", "order", "base_accuracy": {SKILL: {"mean", "min", "max"}},
   "variants": {NAME: {"final_accuracy": {SKILL: {"mean", "min", "max"}}, "final_mean_accuracy": {...},
                       "final_forgetting": {SKILL: worst points}, "steps": the first seed's}},
   "best": NAME, "target_met": bool, "seeds": {SEED: that seed's own result}}
and `continual.png` (the first seed's curves).

    .venv/bin/python benchmarks/continual.py [--job runs/bench-testbed/testbed-s0.yaml ...] [--protect 0.5] [--density 0.5]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402
from common import TESTBED_JOB, DeltaEvaluator, calibration_batches, fisher_on, load_testbed, machine, state_accuracy  # noqa: E402

from graft.adapter_merge import merge_deltas  # noqa: E402
from graft.checkpoint import CheckpointReader  # noqa: E402
from graft.fusion import protected_tensors  # noqa: E402
from graft.expert_packing import pack_expert  # noqa: E402
from graft.experts import Expert  # noqa: E402
from graft.grafting import grafted_tensors  # noqa: E402
from graft.routing import NONE, build_routed  # noqa: E402
from graft.skillpack import PackSettings, SkillPack  # noqa: E402

ROUTER_PROMPTS = 400
SMALL = PackSettings(bits=(3,), band_fractions=(1.0,), budget=1 / 15, quantizer="gptq", allocation="energy_importance")
TUNE_STEPS = 40


def small_pack(tb, skill: str) -> SkillPack:
    """The skill's expert packed to 1/15 of its bf16 delta (SMALL), grids tuned to the expert."""
    deltas = tb.experts[skill]
    return pack_expert(skill, tb.base, Expert(tb.adapters[skill]), deltas, SMALL, calibration_batches=calibration_batches(tb, skill),
                       importance={k: tb.scores[skill][k] for k in deltas}, tune_steps=TUNE_STEPS)


def forgetting(steps: list[dict], order: list[str]) -> dict[str, float]:
    final = steps[-1]["accuracy"]
    return {s: round(100 * (steps[i]["accuracy"][s] - final[s]), 2) for i, s in enumerate(order)}


def plot(variants: dict, order: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variants), figsize=(3.2 * len(variants), 3), sharey=True)
    for ax, (name, v) in zip(axes, variants.items()):
        for skill in [*order, "general"]:
            xs = [i + 1 for i, st in enumerate(v["steps"]) if skill in st["accuracy"]]
            ax.plot(xs, [v["steps"][x - 1]["accuracy"][skill] for x in xs], marker="o", label=skill)
        ax.set_title(name)
        ax.set_xticks(range(1, len(order) + 1), [f"+{s}" for s in order], rotation=30)
    axes[0].set_ylabel("held-out exact match")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def one_seed(job: str, protect: float, density: float) -> dict:
    """Every variant on one seed's testbed: the accuracy after each step, forgetting, and which variant did best."""
    tb = load_testbed(job)
    ev = DeltaEvaluator(tb)
    order = tb.skills
    packs = [SkillPack.load(tb.packs[s]) for s in order]
    reader = CheckpointReader(tb.base)
    base_accuracy = ev.accuracy(None, [*order, "general"])
    base_scores = fisher_on(ev.load(None), tb.tokenizer, tb.train["general"][:256])
    rng = random.Random(tb.spec.seed)

    def prompts(skill: str) -> list[str]:
        rows = list(tb.train[skill])
        rng.shuffle(rows)
        return [r["prompt"] for r in rows[:ROUTER_PROMPTS]]

    def step_fns():
        yield "additive", lambda k: state_accuracy(ev, dict(grafted_tensors(reader, packs[:k], [1.0] * k)), seen(k))
        yield "protected", lambda k: state_accuracy(ev, dict(protected_tensors(
            reader, packs[:k], [tb.scores[s] for s in order[:k]], protect, base_scores)), seen(k))

        def routed(k: int, over: list[SkillPack] = packs) -> dict[str, float]:
            by_class = {s: prompts(s) for s in order[:k]} | {NONE: prompts("general")}
            model = build_routed(tb.base, over[:k], by_class, seed=tb.spec.seed, tokenizer=tb.tokenizer_path)
            return ev.model_accuracy(model, seen(k))

        yield "routed", routed
        small = [small_pack(tb, s) for s in order]
        yield "routed_1_15", lambda k: routed(k, small)
        yield "ties", lambda k: ev.accuracy(merge_deltas([tb.experts[s] for s in order[:k]], "ties", density=density,
                                                         seed=tb.spec.seed), seen(k))

    def seen(k: int) -> list[str]:
        return [*order[:k], "general"]

    variants: dict[str, dict] = {}
    for name, fn in step_fns():
        steps = []
        for k in range(1, len(order) + 1):
            steps.append({"added": order[k - 1], "accuracy": fn(k)})
            print(f"seed {tb.spec.seed}", name, json.dumps(steps[-1]), flush=True)
        final = steps[-1]["accuracy"]
        variants[name] = {"steps": steps, "final_forgetting": forgetting(steps, order),
                          "final_mean_accuracy": sum(final[s] for s in order) / len(order)}
    variants["protected"]["protect_fraction"] = protect
    variants["ties"]["density"] = density
    best = max((n for n in variants if n != "ties"), key=lambda n: variants[n]["final_mean_accuracy"])
    return {"seed": tb.spec.seed, "job": str(job), "order": order, "base_accuracy": base_accuracy, "variants": variants,
            "best": best, "target_met": met(variants, best)}


def met(variants: dict, best: str) -> bool:
    """The target on one seed: the best variant forgets at most 2 points of any skill and beats TIES."""
    return (max(variants[best]["final_forgetting"].values()) <= 2.0
            and variants[best]["final_mean_accuracy"] > variants["ties"]["final_mean_accuracy"])


def stat(values: list[float]) -> dict[str, float]:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def over_seeds(runs: list[dict]) -> dict:
    """The seeds' results side by side: each final accuracy as mean/min/max, forgetting at its worst seed, and the
    best variant by mean final accuracy, which must meet the target on every seed."""
    order = runs[0]["order"]
    variants = {}
    for name in runs[0]["variants"]:
        finals = [r["variants"][name]["steps"][-1]["accuracy"] for r in runs]
        variants[name] = {
            "final_accuracy": {s: stat([f[s] for f in finals]) for s in [*order, "general"]},
            "final_mean_accuracy": stat([r["variants"][name]["final_mean_accuracy"] for r in runs]),
            "final_forgetting": {s: max(r["variants"][name]["final_forgetting"][s] for r in runs) for s in order},
            "steps": runs[0]["variants"][name]["steps"],  # the first seed's curve, for the figure
        }
    best = max((n for n in variants if n != "ties"), key=lambda n: variants[n]["final_mean_accuracy"]["mean"])
    return {"order": order, "base_accuracy": {s: stat([r["base_accuracy"][s] for r in runs]) for s in [*order, "general"]},
            "variants": variants, "best": best, "target_met": all(met(r["variants"], best) for r in runs),
            "seeds": {str(r["seed"]): r for r in runs}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", nargs="+", default=[TESTBED_JOB],
                    help="testbed jobs, one per seed; default: the first seed's of benchmarks/testbed.py")
    ap.add_argument("--out", default="benchmarks/results/continual.json")
    ap.add_argument("--protect", type=float, default=0.5)
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args()
    started = time.time()

    runs = [one_seed(job, args.protect, args.density) for job in args.job]
    result = over_seeds(runs)
    out = {"provenance": provenance([r["seed"] for r in runs], started), "job": [str(j) for j in args.job],
           "machine": machine(), **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(result["variants"], result["order"], Path(args.out).with_suffix(".png"))
    print(json.dumps({n: {"final_forgetting": v["final_forgetting"], "final_mean_accuracy": v["final_mean_accuracy"]}
                      for n, v in result["variants"].items()}, indent=1))


if __name__ == "__main__":
    main()
