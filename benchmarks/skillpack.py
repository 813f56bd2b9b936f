"""SkillPack: how small a skill gets and how much of the skill it keeps (issue: graft/ library).

For each testbed skill, from the LoRA expert that `jobs/testbed.yaml` trains:
- `full_delta`: the expert itself (ΔW = B A, stored dense in bf16: the reference bytes);
- `skillpack`: SkillPacks over a grid of energy β, bits per rank band and importance-based tensor
  selection (`min_importance_share`), plain and calibration-aware (SVD weighted by each layer's input
  RMS on the skill's training data), each grafted alone into the base;
- `magnitude_prune`: the expert's delta pruned by magnitude to the bytes of the reference SkillPack
  (6 bytes per kept entry: int32 index + bf16 value), grafted alone;
- `task_arithmetic`, `ties`, `dare_ties`: the usual way to put the experts in one model, a merge of
  all experts, each sparsified to the reference SkillPack's bytes (density = bytes / (6 · entries)).
The reference SkillPack is the smallest grid point with bytes ≤ 1/15 of the bf16 delta.

Writes `benchmarks/results/skillpack.json`:
  {"machine", "base_accuracy", "expert_accuracy",
   "rows": [{"skill", "method", "settings", "bytes", "bytes_ratio", "accuracy", "general_accuracy", "gain_retained"}],
   "target": {SKILL: {"best_within_1_15": row, "met": bool}}}

    .venv/bin/python benchmarks/skillpack.py [--job jobs/testbed.yaml] [--out benchmarks/results/skillpack.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DeltaEvaluator, expert_input_scales, load_testbed, machine  # noqa: E402

from graft.adapter_merge import merge_deltas  # noqa: E402
from graft.checkpoint import CheckpointReader  # noqa: E402
from graft.fingerprint import base_fingerprint  # noqa: E402
from graft.importance import module_summary  # noqa: E402
from graft.skillpack import PackSettings, pack_skill  # noqa: E402

ENERGIES = (0.8, 0.9, 0.95, 0.99)
BITS = (((8, 4), (0.5, 0.5)), ((4,), (1.0,)), ((4, 2), (0.75, 0.25)), ((4, 2), (0.5, 0.5)))
MIN_SHARES = (0.0, 0.005)
CALIBRATED = (((4,), (1.0,)), ((4, 2), (0.75, 0.25)))  # bits grids also run calibration-aware (activation-weighted SVD)
TARGET_RATIO = 1 / 15
SPARSE_ENTRY_BYTES = 6
MERGES = {"task_arithmetic": {}, "ties": {}, "dare_ties": {}}


def gain(acc: float, base: float, expert: float) -> float:
    return (acc - base) / (expert - base) if expert > base else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--job", default="jobs/testbed.yaml")
    ap.add_argument("--out", default="benchmarks/results/skillpack.json")
    args = ap.parse_args()

    tb = load_testbed(args.job)
    ev = DeltaEvaluator(tb)
    reader = CheckpointReader(tb.base)
    base_acc = ev.accuracy(None, [*tb.skills, "general"])
    rows: list[dict] = []
    expert_acc: dict[str, dict[str, float]] = {}
    reference: dict[str, dict] = {}
    for skill in tb.skills:
        deltas = tb.experts[skill]
        bf16 = sum(2 * math.prod(d.shape) for d in deltas.values())
        entries = sum(math.prod(d.shape) for d in deltas.values())
        acc = ev.accuracy(deltas, [skill, "general"])
        expert_acc[skill] = acc
        b, e = base_acc[skill], acc[skill]

        def row(method: str, settings: dict, nbytes: int, accuracy: dict[str, float], skill=skill, b=b, e=e, bf16=bf16) -> dict:
            r = {"skill": skill, "method": method, "settings": settings, "bytes": nbytes, "bytes_ratio": nbytes / bf16,
                 "accuracy": accuracy[skill], "general_accuracy": accuracy["general"], "gain_retained": gain(accuracy[skill], b, e)}
            rows.append(r)
            print(json.dumps(r), flush=True)
            return r

        row("full_delta", {"lora_rank": next(iter(deltas.values())).A.shape[0]}, bf16, acc)
        share = {k: v["share"] for k, v in module_summary(tb.scores[skill]).items()}
        scales = expert_input_scales(tb, skill)
        packed = []
        grid = [(e, b, m, False) for e, b, m in itertools.product(ENERGIES, BITS, MIN_SHARES)]
        grid += [(e, b, 0.0, True) for e, b in itertools.product(ENERGIES, CALIBRATED)]
        for energy, (bits, bands), min_share, calibrated in grid:
            kept = {k: d for k, d in deltas.items() if share.get(k, 1.0) >= min_share}
            pack = pack_skill(skill, kept, base_fingerprint(reader, list(kept)),
                              PackSettings(energy=energy, bits=bits, band_fractions=bands), input_scales=scales if calibrated else None)
            settings = {"energy": energy, "bits": list(bits), "band_fractions": list(bands), "min_importance_share": min_share,
                        "tensors": len(kept), "calibrated": calibrated}
            packed.append(row("skillpack", settings, pack.manifest["total_bytes"],
                              ev.accuracy({k: pack.delta(k) for k in pack.keys()}, [skill, "general"])))
        small = [r for r in packed if r["bytes_ratio"] <= TARGET_RATIO]
        reference[skill] = max(small, key=lambda r: (r["gain_retained"], -r["bytes"])) if small else min(packed, key=lambda r: r["bytes"])
        density = min(1.0, reference[skill]["bytes"] / (SPARSE_ENTRY_BYTES * entries))
        pruned = merge_deltas([deltas], "ties", density=density)  # one input: TIES is magnitude pruning
        row("magnitude_prune", {"density": density}, reference[skill]["bytes"], ev.accuracy(pruned, [skill, "general"]))
        reference[skill]["density"] = density

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

    target = {s: {"best_within_1_15": {k: v for k, v in reference[s].items() if k != "density"},
                  "met": reference[s]["bytes_ratio"] <= TARGET_RATIO and reference[s]["gain_retained"] >= 0.95} for s in tb.skills}
    out = {"machine": machine(), "base_accuracy": base_acc, "expert_accuracy": expert_acc, "rows": rows, "target": target}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(target, indent=1))


if __name__ == "__main__":
    main()
