"""SkillPack: how small a skill gets and how much of the skill it keeps (issue: graft/ library).

For each testbed skill, from the LoRA expert that `jobs/testbed.yaml` trains:
- `full_delta`: the expert itself (ΔW = B A, stored dense in bf16: the reference bytes);
- `skillpack`: SkillPacks, each grafted alone into the base, over two grids:
  - the energy rule: β × bits per rank band × importance-based tensor selection (`min_importance_share`),
    plain and with the SVD weighted by each layer's input RMS (`weighted_svd`);
  - the budget rule: at most 1/15 of the bf16 delta, ranks allocated across matrices by energy,
    importance (the skill's Fisher scores) or both, rounded to nearest or GPTQ-style against each layer's
    inputs (calibration: the expert on its training rows plus the replayed share of `general`);
    the same with grid tuning (each column's fp16 grid fitted to the expert's answers on the calibration
    rows, 40 passes; codes and bytes unchanged); and the best of each at other budgets, to show where
    each skill reaches 95%;
- `magnitude_prune`: the expert's delta pruned by magnitude to the bytes of the reference SkillPack
  (6 bytes per kept entry: int32 index + bf16 value), grafted alone;
- `task_arithmetic`, `ties`, `dare_ties`: the usual way to put the experts in one model, a merge of
  all experts, each sparsified to the reference SkillPack's bytes (density = bytes / (6 · entries)).
The first seed's sweep shortlists its 6 best packs within 1/15 of the bf16 delta (by gain retained, then bytes).
With `--select JOB ...` (other seeds' testbed jobs) each of those settings is packed again from those seeds' experts,
and the reference setting is the one whose worst selecting seed keeps the most gain (then fewer bytes): a setting
chosen on one seed overfits it, most at the smallest budgets. With `--confirm JOB ...` (held-out seeds) the chosen
setting is packed from each held-out seed's expert untouched. Every seed then measures its `magnitude_prune` and the
merges at its reference pack's bytes. The target holds only if it holds on every seed; `met_held_out` says whether it
held on the seeds the choice never saw.

Writes `benchmarks/results/skillpack.json`:
  {"machine", "base_accuracy", "expert_accuracy",
   "rows": [{"skill", "method", "settings", "bytes", "bytes_ratio", "accuracy", "general_accuracy", "gain_retained"}],
   "target": {SKILL: {"best_within_1_15": row, "chosen_by", "candidates": [{"settings", "gain_retained_by_seed"}],
              "met": bool, "met_held_out": bool | null, "by_seed": {SEED: {"accuracy", "general_accuracy",
              "gain_retained", "bytes_ratio", "met", "role"}}, "accuracy": {"mean", "min", "max"}, "gain_retained": {...}}},
   "seeds": {SEED: {"job", "role", "base_accuracy", "expert_accuracy", "rows"}}}  (the --select and --confirm seeds)
and `benchmarks/results/skillpack.png` (gain retained against bytes, per skill).

    .venv/bin/python benchmarks/skillpack.py [--job runs/bench-testbed/testbed-s0.yaml] [--out benchmarks/results/skillpack.json]
        [--select runs/bench-testbed/testbed-s1.yaml] [--confirm runs/bench-testbed/testbed-s2.yaml]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from provenance import provenance  # noqa: E402
from common import TESTBED_JOB, DeltaEvaluator, calibration_batches, load_testbed, machine  # noqa: E402

from graft.adapter_merge import merge_deltas  # noqa: E402
from graft.checkpoint import CheckpointReader  # noqa: E402
from graft.calibration import LayerMoments  # noqa: E402
from graft.fingerprint import base_fingerprint  # noqa: E402
from graft.grid_tuning import tune_grids  # noqa: E402
from graft.lora import load_with_adapter  # noqa: E402
from graft.importance import module_summary  # noqa: E402
from graft.skillpack import PackSettings, pack_skill  # noqa: E402

ENERGIES = (0.8, 0.9, 0.95, 0.99)
BITS = (((8, 4), (0.5, 0.5)), ((4,), (1.0,)), ((4, 2), (0.75, 0.25)), ((4, 2), (0.5, 0.5)))
MIN_SHARES = (0.0, 0.005)
WEIGHTED = (((4,), (1.0,)), ((4, 2), (0.75, 0.25)))  # bits grids also run with the activation-weighted SVD
TARGET_RATIO = 1 / 15
BUDGET_BITS = (((4,), (1.0,)), ((3,), (1.0,)), ((4, 3), (0.5, 0.5)))
ALLOCATIONS = ("energy", "importance", "energy_importance")
QUANTIZERS = ("rtn", "gptq")
CURVE = (1 / 25, 1 / 20, 1 / 12, 1 / 10, 1 / 8)  # budgets the best 1/15 budget setting is also run at
TUNE_STEPS = 40  # grid tuning passes (graft.grid_tuning) for the tuned budget rows
SPARSE_ENTRY_BYTES = 6
MERGES = {"task_arithmetic": {}, "ties": {}, "dare_ties": {}}
SHORTLIST = 6  # the first seed's best packs within 1/15 that the selecting seeds measure too


def gain(acc: float, base: float, expert: float) -> float:
    return (acc - base) / (expert - base) if expert > base else float("nan")


class SkillRows:
    """The rows of one skill: each a pack (or the expert, or a pruned delta) grafted alone into the base."""

    def __init__(self, tb, ev: DeltaEvaluator, reader: CheckpointReader, skill: str, base_acc: dict[str, float], rows: list[dict]) -> None:
        self.tb, self.ev, self.reader, self.skill, self.rows = tb, ev, reader, skill, rows
        self.deltas = tb.experts[skill]
        self.bf16 = sum(2 * math.prod(d.shape) for d in self.deltas.values())
        self.base = base_acc[skill]
        self.expert_acc = ev.accuracy(self.deltas, [skill, "general"])
        self.share = {k: v["share"] for k, v in module_summary(tb.scores[skill]).items()}
        self.expert, self.batches = load_with_adapter(tb.base, tb.adapters[skill]), calibration_batches(tb, skill)
        self.moments = dict(LayerMoments(self.expert, self.batches, list(self.deltas)))  # every pack of the grid reads them all
        self.packed: list[dict] = []

    def row(self, method: str, settings: dict, nbytes: int, accuracy: dict[str, float]) -> dict:
        r = {"skill": self.skill, "method": method, "settings": settings, "bytes": nbytes, "bytes_ratio": nbytes / self.bf16,
             "accuracy": accuracy[self.skill], "general_accuracy": accuracy["general"],
             "gain_retained": gain(accuracy[self.skill], self.base, self.expert_acc[self.skill])}
        self.rows.append(r)
        print(json.dumps(r), flush=True)
        return r

    def pack(self, settings: PackSettings, min_share: float = 0.0, tune_steps: int = 0) -> dict:
        kept = {k: d for k, d in self.deltas.items() if self.share.get(k, 1.0) >= min_share}
        pack = pack_skill(self.skill, kept, base_fingerprint(self.reader, list(kept)), settings, calibration=self.moments,
                          importance={k: self.tb.scores[self.skill][k] for k in kept})
        if tune_steps:
            pack = tune_grids(pack, self.ev.load(None), self.expert, self.batches, tune_steps)
        described = {"energy": settings.energy, "bits": list(settings.bits), "band_fractions": list(settings.band_fractions),
                     "min_importance_share": min_share, "tensors": len(kept), "weighted_svd": settings.weighted_svd,
                     "budget": settings.budget, "allocation": settings.allocation, "quantizer": settings.quantizer,
                     "tune_steps": tune_steps}
        for unused in (("budget", "allocation") if settings.budget is None else ("energy",)):
            del described[unused]
        accuracy = self.ev.accuracy({k: pack.delta(k) for k in pack.keys()}, [self.skill, "general"])
        r = self.row("skillpack", described, pack.manifest["total_bytes"], accuracy)
        self.packed.append(r)
        return r

    def find(self, described: dict) -> dict:
        """The pack row made with these settings (as `pack` describes them; `tensors` follows from the rest)."""
        same = [r for r in self.packed if _setting(r["settings"]) == _setting(described)]
        if not same:
            raise KeyError(f"{self.skill}: no pack with settings {described}")
        return same[0]

    def pack_described(self, described: dict) -> dict:
        """The pack row for settings as `pack` describes them (another seed's), packed here unless it already was."""
        try:
            return self.find(described)
        except KeyError:
            fields = {f.name for f in dataclasses.fields(PackSettings)}
            settings = PackSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in described.items() if k in fields})
            return self.pack(settings, described["min_importance_share"], described["tune_steps"])


def _setting(described: dict) -> dict:
    return {k: v for k, v in described.items() if k != "tensors"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default=TESTBED_JOB, help="a testbed job; default: the first seed's of benchmarks/testbed.py")
    ap.add_argument("--out", default="benchmarks/results/skillpack.json")
    ap.add_argument("--select", nargs="*", default=[],
                    help="other seeds' testbed jobs that measure the first seed's shortlist: the setting is chosen by its worst seed")
    ap.add_argument("--confirm", nargs="*", default=[], help="held-out seeds' testbed jobs: the chosen settings measured untouched")
    args = ap.parse_args()
    started = time.time()

    first = SeedRun(args.job, "sweep")
    for sk in first.skills.values():
        sweep(sk)
    selecting = [first, *(SeedRun(job, "select") for job in args.select)]
    shortlists = {s: shortlist(sk) for s, sk in first.skills.items()}
    for run in selecting[1:]:
        for s, sk in run.skills.items():
            for settings in shortlists[s]:
                sk.pack_described(settings)
    chosen = {s: choose(s, shortlists[s], selecting) for s in first.skills}
    runs = [*selecting, *(SeedRun(job, "held_out") for job in args.confirm)]
    for run in runs:
        run.settle(chosen)

    target = {}
    for s in first.skills:
        t = target[s] = {"best_within_1_15": {k: v for k, v in first.reference[s].items() if k != "density"},
                         "chosen_by": f"worst gain retained over seeds {[r.seed for r in selecting]} among the first seed's "
                                      f"{len(shortlists[s])} best packs within 1/15",
                         "candidates": [{"settings": c, "gain_retained_by_seed": {str(r.seed): r.skills[s].find(c)["gain_retained"]
                                                                                  for r in selecting}} for c in shortlists[s]],
                         "by_seed": {str(r.seed): {**verdict(r.reference[s]), "role": r.role} for r in runs}}
        t["met"] = all(v["met"] for v in t["by_seed"].values())
        held_out = [v["met"] for v in t["by_seed"].values() if v["role"] == "held_out"]
        t["met_held_out"] = all(held_out) if held_out else None
        for key in ("accuracy", "gain_retained", "general_accuracy"):
            values = [v[key] for v in t["by_seed"].values()]
            t[key] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    seeds = {str(r.seed): {"job": str(r.job), "role": r.role, "base_accuracy": r.base_acc, "expert_accuracy": r.expert_acc,
                           "rows": r.rows} for r in runs[1:]}
    out = {"provenance": provenance([r.seed for r in runs], started), "job": str(args.job),
           "select_jobs": [str(j) for j in args.select], "confirm_jobs": [str(j) for j in args.confirm],
           "machine": machine(), "base_accuracy": first.base_acc, "expert_accuracy": first.expert_acc, "rows": first.rows,
           "target": target, "seeds": seeds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(args.out).with_suffix(".png"))
    print(json.dumps(target, indent=1))


def verdict(row: dict) -> dict:
    """One seed's reference pack against the target: within 1/15 of the bf16 delta and ≥ 95% of the gain."""
    return {"accuracy": row["accuracy"], "general_accuracy": row["general_accuracy"], "gain_retained": row["gain_retained"],
            "bytes_ratio": row["bytes_ratio"], "met": row["bytes_ratio"] <= TARGET_RATIO and row["gain_retained"] >= 0.95}


def prune_at(sk: SkillRows, nbytes: int) -> float:
    """The `magnitude_prune` row at `nbytes` (6 bytes a kept entry); returns the density it kept."""
    entries = sum(math.prod(d.shape) for d in sk.deltas.values())
    density = min(1.0, nbytes / (SPARSE_ENTRY_BYTES * entries))
    pruned = merge_deltas([sk.deltas], "ties", density=density)  # one input: TIES is magnitude pruning
    sk.row("magnitude_prune", {"density": density}, nbytes, sk.ev.accuracy(pruned, [sk.skill, "general"]))
    return density


def merge_rows(tb, ev: DeltaEvaluator, base_acc: dict, expert_acc: dict, reference: dict[str, dict], rows: list[dict]) -> None:
    """`task_arithmetic`, `ties`, `dare_ties` of all experts, each sparsified to its reference pack's bytes."""
    experts = [tb.experts[s] for s in tb.skills]
    for method, extra in MERGES.items():
        densities = [reference[s]["density"] for s in tb.skills]
        merged = merge_deltas(experts, method, density=densities if method != "task_arithmetic" else 1.0, seed=tb.spec.seed, **extra)
        if method == "task_arithmetic":  # plain TA has no density: sparsify each expert first, at the same bytes
            merged = merge_deltas([merge_deltas([d], "ties", density=p) for d, p in zip(experts, densities)], method)
        acc = ev.accuracy(merged, [*tb.skills, "general"])
        for skill in tb.skills:
            bf16 = sum(2 * math.prod(d.shape) for d in tb.experts[skill].values())
            r = {"skill": skill, "method": method, "settings": {"density": reference[skill]["density"], "experts": tb.skills, **extra},
                 "bytes": reference[skill]["bytes"], "bytes_ratio": reference[skill]["bytes"] / bf16, "accuracy": acc[skill],
                 "general_accuracy": acc["general"], "gain_retained": gain(acc[skill], base_acc[skill], expert_acc[skill][skill])}
            rows.append(r)
            print(json.dumps(r), flush=True)


class SeedRun:
    """One seed's testbed measured: per skill the expert's row (`full_delta`) first, then packs, then (`settle`) the
    chosen pack with magnitude pruning at its bytes and the merges of all experts at those bytes.

    `role` says what the seed did: `sweep` (its grid chose the shortlist), `select` (measured the shortlist, so the
    choice saw it) or `held_out` (measured the chosen setting only).
    """

    def __init__(self, job: str, role: str) -> None:
        self.job, self.role = job, role
        self.tb = load_testbed(job)
        self.seed = self.tb.spec.seed
        self.ev = DeltaEvaluator(self.tb)
        reader = CheckpointReader(self.tb.base)
        self.rows: list[dict] = []
        self.base_acc = self.ev.accuracy(None, [*self.tb.skills, "general"])
        self.skills = {s: SkillRows(self.tb, self.ev, reader, s, self.base_acc, self.rows) for s in self.tb.skills}
        self.expert_acc = {s: sk.expert_acc for s, sk in self.skills.items()}
        for sk in self.skills.values():
            sk.row("full_delta", {"lora_rank": next(iter(sk.deltas.values())).A.shape[0]}, sk.bf16, sk.expert_acc)
        self.reference: dict[str, dict] = {}

    def settle(self, chosen: dict[str, dict]) -> None:
        """Each skill's chosen pack (packed here unless it already was), pruning at its bytes, then the merges."""
        for s, sk in self.skills.items():
            ref = sk.pack_described(chosen[s])
            self.reference[s] = {**ref, "density": prune_at(sk, ref["bytes"])}
        merge_rows(self.tb, self.ev, self.base_acc, self.expert_acc, self.reference, self.rows)


def sweep(sk: SkillRows) -> None:
    """The first seed's grid: the energy rule, the budget rule at 1/15, and the best of each at the other budgets."""
    for energy, (bits, bands), min_share in itertools.product(ENERGIES, BITS, MIN_SHARES):
        sk.pack(PackSettings(energy=energy, bits=bits, band_fractions=bands), min_share)
    for energy, (bits, bands) in itertools.product(ENERGIES, WEIGHTED):
        sk.pack(PackSettings(energy=energy, bits=bits, band_fractions=bands, weighted_svd=True))
    budgeted = {}
    for (bits, bands), allocation, quantizer in itertools.product(BUDGET_BITS, ALLOCATIONS, QUANTIZERS):
        st = PackSettings(bits=bits, band_fractions=bands, budget=TARGET_RATIO, allocation=allocation, quantizer=quantizer)
        budgeted[st] = sk.pack(st)["gain_retained"]
    best = max(budgeted, key=budgeted.get)
    for budget in CURVE:
        sk.pack(dataclasses.replace(best, budget=budget))
    tuned = {}
    for (bits, bands), quantizer in itertools.product(BUDGET_BITS, QUANTIZERS):
        st = PackSettings(bits=bits, band_fractions=bands, budget=TARGET_RATIO, allocation="energy_importance", quantizer=quantizer)
        tuned[st] = sk.pack(st, tune_steps=TUNE_STEPS)["gain_retained"]
    best = max(tuned, key=tuned.get)
    for budget in CURVE:
        sk.pack(dataclasses.replace(best, budget=budget), tune_steps=TUNE_STEPS)


def shortlist(sk: SkillRows) -> list[dict]:
    """The first seed's `SHORTLIST` best packs within 1/15 of the bf16 delta, by gain retained, then fewer bytes
    (the smallest pack alone when none is that small): the settings the selecting seeds measure too."""
    small = sorted((r for r in sk.packed if r["bytes_ratio"] <= TARGET_RATIO), key=lambda r: (-r["gain_retained"], r["bytes"]))
    return [r["settings"] for r in small[:SHORTLIST]] or [min(sk.packed, key=lambda r: r["bytes"])["settings"]]


def choose(skill: str, candidates: list[dict], runs: list[SeedRun]) -> dict:
    """The candidate whose worst seed keeps the most gain (a gain above 1 counts as 1: beyond the expert is noise),
    then the one with fewer bytes on average."""
    def worth(c: dict) -> tuple[float, float]:
        found = [run.skills[skill].find(c) for run in runs]
        return min(1.0, *(r["gain_retained"] for r in found)), -sum(r["bytes"] for r in found) / len(found)
    return max(candidates, key=worth)


def plot(out: dict, path: Path) -> None:
    """Gain retained against bytes (fraction of the bf16 delta), one panel per skill, 1/15 and 95% marked."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    skills = list(out["expert_accuracy"])
    fig, axes = plt.subplots(1, len(skills), figsize=(4 * len(skills), 3.6), sharey=True)
    kinds = {"energy rule": ("o", "tab:blue"), "budget, rtn": ("s", "tab:orange"), "budget, gptq": ("D", "tab:green"),
             "budget, tuned grids": ("*", "black"),
             "magnitude_prune": ("x", "tab:red"), "ties": ("^", "tab:purple")}

    def kind(r: dict) -> str | None:
        if r["method"] == "skillpack":
            if "budget" not in r["settings"]:
                return "energy rule"
            return "budget, tuned grids" if r["settings"]["tune_steps"] else f"budget, {r['settings']['quantizer']}"
        return r["method"] if r["method"] in kinds else None

    for ax, skill in zip(axes, skills):
        for name, (marker, color) in kinds.items():
            pts = [(r["bytes_ratio"], r["gain_retained"]) for r in out["rows"] if r["skill"] == skill and kind(r) == name]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, s=18, label=name, alpha=0.8)
        ax.axvline(TARGET_RATIO, color="grey", ls="--", lw=0.8)
        ax.axhline(0.95, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log")
        ticks = [1 / n for n in (40, 25, 15, 10, 6, 4)]
        ax.set_xticks(ticks, [f"1/{round(1 / t)}" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(skill)
        ax.set_xlabel("bytes / bf16 delta")
    axes[0].set_ylabel("gain retained")
    axes[-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
