"""Benchmark report: every result in benchmarks/results/ on one Markdown page, benchmarks/results/REPORT.md.

Each results JSON becomes one section (one measured claim): where it came from (its provenance: commit, dirty
flag, seeds, wall time, and the exact command that wrote it, so every table is tied to the command that makes
it), a table of its headline numbers beside their baselines, and its PNG when there is one. A result without
a provenance block is marked "no provenance: not a claim of main".

Why: the JSONs are the evidence and REPORT.md is the one place to read them. It is generated, never edited, so
a number in it is always the number in its JSON; tests/test_results_provenance.py fails while it is stale.

Each result kind has one small formatter, registered under the JSON's file stem in FORMATTERS; a stem without
one gets a generic two-column table of its values. Accuracies and rates have 3 decimals. Where a result keeps
its seeds, a cell reads "mean [min, max]", from the result's own min/max fields or else its per-seed values;
nothing is computed that the JSON does not hold.

    python benchmarks/report.py [--results benchmarks/results] [--out benchmarks/results/REPORT.md]

Standard library only, and deterministic: files in name order, no clock read, so the same results give the
same bytes. Figures are linked relative to the results folder (where REPORT.md lives).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
REPORT = "REPORT.md"
COMMAND = "python benchmarks/report.py"
MISSING = "–"

Lines = list[str]


# ---------------------------------------------------------------- cells and tables


def num(value: Any, digits: int = 3) -> str:
    """One value as a table cell: floats to `digits` decimals, a {"mean", "min", "max"} dict as mean [min, max]."""
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, Mapping) and "mean" in value:
        return spread(value["mean"], value.get("min"), value.get("max"), digits)
    if isinstance(value, (list, tuple)):
        return ", ".join(num(v, digits) for v in value) if value else MISSING
    return str(value)


def spread(mean: Any, lo: Any = None, hi: Any = None, digits: int = 3) -> str:
    """`mean [lo, hi]`, or the mean alone without both bounds."""
    if lo is None or hi is None:
        return num(mean, digits)
    return f"{num(mean, digits)} [{num(lo, digits)}, {num(hi, digits)}]"


def dig(data: Any, path: Sequence[str]) -> Any:
    """data[path[0]][path[1]]…, or None where a key is missing or a level is not a dict."""
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def seed_stat(row: Mapping, *path: str, digits: int = 3) -> str:
    """`row`'s value at `path` as "mean [min, max]" over the seeds.

    The value may itself be a {"mean", "min", "max"} dict. Otherwise the bounds are the row's own `min`/`max` at
    the same path (as port.json, transfer.json and transplant.json keep them), or else the extremes of the row's
    per-seed values at that path (`seeds`: {SEED: {...}}, as sparse_adapters.json keeps them); one seed, no range.
    """
    mean = dig(row, path)
    if isinstance(mean, Mapping):
        return num(mean, digits)
    lo, hi = dig(row.get("min"), path), dig(row.get("max"), path)
    if lo is None or hi is None:
        seeds = row.get("seeds")
        per_seed = [dig(v, path) for v in seeds.values()] if isinstance(seeds, Mapping) else []
        if len(per_seed) > 1 and all(_is_number(v) for v in per_seed):
            lo, hi = min(per_seed), max(per_seed)
    return spread(mean, lo, hi, digits)


def by_seed(per_seed: Mapping) -> list[tuple[str, Any]]:
    """A {SEED: value} dict's items, numeric seeds in numeric order ("2" before "10"), then any others by name."""
    return sorted(per_seed.items(), key=lambda kv: (not str(kv[0]).isdigit(), int(kv[0]) if str(kv[0]).isdigit() else 0, str(kv[0])))


def code(text: str) -> str:
    """`text` as inline code (a longer fence where the text holds a backtick)."""
    fence = "``" if "`" in text else "`"
    pad = " " if fence == "``" else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else num(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Lines:
    """A Markdown table; str cells as they are, anything else through num()."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


# ---------------------------------------------------------------- formatters, one per result kind


@dataclass(frozen=True)
class Kind:
    """How one kind of result is shown: a section title and its formatter (the JSON -> Markdown lines)."""

    title: str
    render: Callable[[Mapping], Lines]


FORMATTERS: dict[str, Kind] = {}


def formatter(stem: str, title: str) -> Callable[[Callable[[Mapping], Lines]], Callable[[Mapping], Lines]]:
    """Register the decorated function as the formatter of `<stem>.json`."""

    def register(fn: Callable[[Mapping], Lines]) -> Callable[[Mapping], Lines]:
        FORMATTERS[stem] = Kind(title, fn)
        return fn

    return register


TRANSFER_VARIANTS = (
    ("source", "baseline: the source model"),
    ("target_base", "baseline: the bare base"),
    ("gold_full", "reference: full SFT on gold answers"),
    ("distilled_full", "transfer: full SFT on distilled answers"),
    ("pack_1_15", "its SkillPack at 1/15"),
    ("pack_1_30", "its SkillPack at 1/30"),
    ("distilled_lora", "transfer: LoRA on distilled answers"),
    ("lora_pack_1_15", "its SkillPack at 1/15"),
    ("distilled_dpo", "transfer: full SFT, then DPO where it still errs"),
    ("dpo_pack_1_15", "its SkillPack at 1/15"),
)


@formatter("transfer", "cross-model transfer (GraftLLM)")
def transfer(data: Mapping) -> Lines:
    lines: Lines = []
    for row in data.get("rows", []):
        skill = row.get("skill", "?")
        lines += [f"Skill `{skill}`: held-out exact match on the skill and on `general`, mean [min, max] over seeds.", ""]
        lines += table(
            ["variant", "what", f"{skill} accuracy", "general", "bytes ratio"],
            ([v, what, seed_stat(row, v), seed_stat(row, "general", v), seed_stat(row, f"{v}_bytes_ratio", digits=4)]
             for v, what in TRANSFER_VARIANTS if v in row),
        )
    rows = []
    for skill, target in sorted(data.get("target", {}).items()):
        for seed, t in by_seed(target.get("per_seed", {})):
            rows.append([skill, seed, t.get("gain_retained"), t.get("source_retained"), t.get("met")])
        rows.append([skill, "every seed", "", "", target.get("met_on_every_seed")])
    if rows:
        lines += ["Target:", ""] + table(["skill", "seed", "gain retained", "source retained", "met"], rows)
    return lines


@formatter("port", "patch porting to new base versions (PortLLM)")
def port(data: Mapping) -> Lines:
    lines = ["Accuracy on the skill (then on `general`) of the new base alone (zero-shot), with the v1 patch (ported, "
             "nothing trained) and with a LoRA trained on it (fine-tuned); mean [min, max] over seeds.", ""]
    lines += table(
        ["skill", "base", "zero-shot", "ported", "fine-tuned", "general: zero-shot", "general: ported", "general: fine-tuned",
         "port s", "fine-tune s"],
        ([row.get("skill"), row.get("base"), seed_stat(row, "zero_shot"), seed_stat(row, "ported"), seed_stat(row, "finetuned"),
          seed_stat(row, "general", "zero_shot"), seed_stat(row, "general", "ported"), seed_stat(row, "general", "finetuned"),
          seed_stat(row, "port_seconds", digits=1), seed_stat(row, "finetune_seconds", digits=1)]
         for row in data.get("rows", [])),
    )
    rows = []
    for skill, t in sorted(data.get("target", {}).items()):
        by_version = ", ".join(f"{b} {num(v)}" for b, v in t.get("ported_by_version", {}).items())
        below = ", ".join(f"seed {s}: {num(v, 1)}" for s, v in by_seed(t.get("v2_points_below_finetuned", {})))
        rows.append([skill, by_version, num(t.get("decay_points_v2_to_last"), 1), below, t.get("met_on_every_seed")])
    if rows:
        lines += ["Target:", ""] + table(
            ["skill", "ported by version", "decay v2 → last (points)", "v2 points below fine-tuned", "met on every seed"], rows)
    return lines


@formatter("sparse_adapters", "sparse adapters against dense LoRA by trainable parameters")
def sparse_adapters(data: Mapping) -> Lines:
    lines = [f"Skill `{data.get('skill', '?')}`, {num(data.get('steps'))} steps; accuracy and `general`, mean [min, max] over seeds. "
             "Baselines: the `lora` rows.", ""]
    lines += table(
        ["variant", "method", "rule", "keep fraction", "trainable params", "accuracy", "general"],
        ([row.get("variant"), row.get("method"), row.get("rule"), row.get("keep_fraction"), row.get("trainable_params"),
          seed_stat(row, "accuracy"), seed_stat(row, "general")] for row in data.get("rows", [])),
    )
    target = data.get("target")
    if isinstance(target, Mapping):
        pairs = target.get("pairs") or []
        lines += [f"Target: {target.get('rule', MISSING)}: met {num(target.get('met'))}; pairs: "
                  + ("; ".join(json.dumps(p, sort_keys=True) for p in pairs) if pairs else "none"), ""]
    return lines


@formatter("transplant", "concept transplantation (ConTrans) against a random direction")
def transplant(data: Mapping) -> Lines:
    lines = [f"Layer source {num(data.get('layer_source'))} → target {num(data.get('layer_target'))}; held-out R² of the "
             f"affine map {seed_stat(data, 'affine_r2_heldout')}. Rates mean [min, max] over seeds; the random direction of "
             "the same norm is the baseline.", ""]
    lines += table(
        ["α", "behaviour rate", "random direction: behaviour rate", "general"],
        ([num(row.get("alpha"), 1), seed_stat(row, "behaviour_rate"), seed_stat(row, "random_behaviour_rate"),
          seed_stat(row, "general")] for row in data.get("rows", [])),
    )
    t = data.get("target")
    if isinstance(t, Mapping):
        lines += table(["behaviour at α=0", "best behaviour", "α meeting the target", "random control max", "met"],
                       [[t.get("behaviour_at_0"), t.get("best_behaviour"), num(t.get("alphas_meeting_it"), 1),
                         t.get("random_control_max"), t.get("met")]])
    return lines


FAULT_COUNTS = ("cases", "clean_refusals", "expected_successes", "tracebacks", "data_lost", "silent_success", "other_failures",
                "worker_kill_resumed", "target_met")


@formatter("faults", "hostile, damaged or interrupted inputs through the command line")
def faults(data: Mapping) -> Lines:
    lines = table(["outcome", "count"], ([k, data[k]] for k in FAULT_COUNTS if k in data))
    groups: dict[str, dict[str, int]] = {}
    for row in data.get("rows", []):
        verdicts = groups.setdefault(str(row.get("group")), {})
        verdicts[str(row.get("verdict"))] = verdicts.get(str(row.get("verdict")), 0) + 1
    names = sorted({v for verdicts in groups.values() for v in verdicts})
    if groups:
        lines += ["Verdicts by group:", ""] + table(
            ["group", *names], ([g, *(groups[g].get(n, 0) for n in names)] for g in sorted(groups)))
    return lines


@formatter("testbed", "the testbed's models and LoRA experts against their quality gates")
def testbed(data: Mapping) -> Lines:
    accuracy = data.get("accuracy", {})
    skills: list[str] = []
    for per_skill in accuracy.values():
        skills += [s for s in per_skill if s not in skills]
    behaviour = data.get("behaviour_rate", {})
    seeds = ", ".join(str(k) for k in data.get("seeds", [])) or MISSING
    lines = [f"Seeds {seeds}; each cell is mean [min, max] over them, and every gate is judged on the worst seed. "
             f"Testbed build {num(data.get('build_seconds'), 1)} s.", ""]
    asked = data.get("behaviour_rate_asked", {})
    lines += table(["model", *skills, "concept unasked", "concept asked"],
                   ([model, *(per_skill.get(s) for s in skills), behaviour.get(model), asked.get(model)]
                    for model, per_skill in accuracy.items()))
    gates = data.get("gates", {})
    if gates:
        lines += table(["gate", "passed"], sorted(gates.items()))
    return lines


SKILLPACK_BASELINES = ("full_delta", "magnitude_prune", "task_arithmetic", "ties", "dare_ties")


@formatter("skillpack", "SkillPack bytes and accuracy against merges and pruning at the same bytes")
def skillpack(data: Mapping) -> Lines:
    rows = data.get("rows", [])
    seeds = data.get("seeds") or {}
    header = ["skill", "method", "bytes ratio", "accuracy", "general", "gain retained"]

    def over(values: list[Any]) -> Any:
        """The first seed's value alone, or mean [min, max] when the confirming seeds add theirs."""
        numbers = [v for v in values if _is_number(v)]
        return spread(sum(numbers) / len(numbers), min(numbers), max(numbers)) if len(numbers) > 1 else values[0]

    def cell(skill: str, method: str, key: str, first: Any) -> Any:
        return over([first, *(r.get(key) for m in seeds.values() for r in m.get("rows", [])
                              if r.get("skill") == skill and r.get("method") == method)])

    out = []
    for skill, target in sorted(data.get("target", {}).items()):
        base = [over([dig(data, ("base_accuracy", k)), *(dig(m, ("base_accuracy", k)) for m in seeds.values())])
                for k in (skill, "general")]
        out.append([skill, "base", MISSING, *base, MISSING])
        for row in rows:
            if row.get("skill") == skill and row.get("method") in SKILLPACK_BASELINES:
                m = row["method"]
                out.append([skill, m, num(row.get("bytes_ratio"), 4), cell(skill, m, "accuracy", row.get("accuracy")),
                            cell(skill, m, "general_accuracy", row.get("general_accuracy")),
                            cell(skill, m, "gain_retained", row.get("gain_retained"))])
        best = target.get("best_within_1_15") or {}
        headline = [target.get(k) if isinstance(target.get(k), Mapping) else best.get(k)
                    for k in ("accuracy", "general_accuracy", "gain_retained")]  # over seeds when confirmed
        out.append([skill, f"**skillpack, best ≤ 1/15** (met: {num(target.get('met'))})", num(best.get("bytes_ratio"), 4),
                    *headline])
    packs = sum(1 for r in rows if r.get("method") == "skillpack")
    lines = [f"{packs} settings measured on the first seed; per skill, the chosen SkillPack within 1/15 of the bf16 delta "
             "beside the expert (`full_delta`), pruning and merges at the same bytes."]
    role = {k: m.get("role", "held_out") for k, m in seeds.items()}
    selecting = [k for k, _ in by_seed(seeds) if role[k] == "select"]
    held_out = [k for k, _ in by_seed(seeds) if role[k] == "held_out"]
    if selecting:
        lines[0] += (f" Seed{'s' if len(selecting) > 1 else ''} {', '.join(selecting)} measured the first seed's best packs "
                     "too, and the setting is the one whose worst seed keeps the most gain.")
    if held_out:
        lines[0] += (f" Held-out seed{'s' if len(held_out) > 1 else ''} {', '.join(held_out)} pack the chosen setting from "
                     "their own experts, untouched.")
    if seeds:
        lines[0] += " Cells are mean [min, max] over all seeds, the bytes ratio the first seed's; the target must hold on each."
    verdicts = [f"{skill}: met on every seed {num(t.get('met'))}, on the held-out seeds {num(t.get('met_held_out'))}"
                for skill, t in sorted(data.get("target", {}).items()) if "met_held_out" in t]
    if verdicts:
        lines += ["", "; ".join(verdicts) + "."]
    return [*lines, ""] + table(header, out)


@formatter("continual", "continual grafting of several packs")
def continual(data: Mapping) -> Lines:
    order = list(data.get("order", []))
    base = data.get("base_accuracy", {})
    rows = [["base", *(base.get(s) for s in order), base.get("general"), MISSING, MISSING]]
    for name, v in data.get("variants", {}).items():
        final = v.get("final_accuracy") or (v.get("steps") or [{}])[-1].get("accuracy", {})
        forgetting = ", ".join(f"{s} {num(p, 1)}" for s, p in v.get("final_forgetting", {}).items())
        rows.append([name, *(final.get(s) for s in order), final.get("general"), v.get("final_mean_accuracy"), forgetting or MISSING])
    seeds = data.get("seeds") or {}
    over = (f" Seeds {', '.join(k for k, _ in by_seed(seeds))}: each accuracy is mean [min, max] over them, forgetting "
            "the worst seed's, and the target must hold on every seed." if len(seeds) > 1 else "")
    lines = [f"Skills added in the order {', '.join(order)}; accuracy after the last one.{over} Best: "
             f"{code(str(data.get('best', MISSING)))}; target met: {num(data.get('target_met'))}.", ""]
    return lines + table(["variant", *order, "general", "final mean", "forgetting (points)"], rows)


def _with_runs(row: Mapping, tool: str) -> str:
    """A tool's median wall seconds, and its runs when there were several."""
    runs = row.get(f"{tool}_wall_s_runs") or []
    median = num(row.get(f"{tool}_wall_s"), 2)
    return f"{median} ({', '.join(num(r, 1) for r in runs)})" if len(runs) > 1 else median


@formatter("merge_speed", "TIES merge, graftline against mergekit 0.1.5")
def merge_speed(data: Mapping) -> Lines:
    lines = [f"{data['comparison']}", ""] if data.get("comparison") else []
    return lines + table(
        ["parameters", "graftline s", "mergekit s", "speedup", "speedup, worst pair", "graftline peak MB",
         "mergekit peak MB", "max abs diff", "differing elements", "all threshold ties", "max abs diff outside ties"],
        ([f"{row['params']:,}" if _is_number(row.get("params")) else row.get("params"),
          _with_runs(row, "graftline"), _with_runs(row, "mergekit"), num(row.get("speedup"), 2),
          num(row.get("speedup_worst"), 2) if "speedup_worst" in row else "–", num(row.get("graftline_peak_rss_mb"), 1),
          num(row.get("mergekit_peak_rss_mb"), 1),
          f"{row['max_abs_diff']:.2e}" if _is_number(row.get("max_abs_diff")) else row.get("max_abs_diff"),
          num(row.get("differing_elements")), num(row.get("all_differences_are_threshold_ties")),
          f"{row['max_abs_diff_outside_ties']:.2e}" if _is_number(row.get("max_abs_diff_outside_ties"))
          else row.get("max_abs_diff_outside_ties")]
         for row in data.get("rows", [])),
    )


@formatter("scaling", "importance scoring and training from 1 to 2 workers")
def scaling(data: Mapping) -> Lines:
    scoring, training = data.get("scoring_tokens_per_s", {}), data.get("training_steps_per_s", {})
    workers = sorted(set(scoring) | set(training), key=lambda w: (len(w), w))
    lines = [f"Model `{data.get('model', '?')}`; scoring efficiency {num(data.get('scoring_efficiency'))}.", ""]
    lines += table(["workers", "scoring tokens/s", "training steps/s"],
                   ([w, num(scoring.get(w), 1), num(training.get(w), 2)] for w in workers))
    return lines + ([f"Notes: {data['notes']}", ""] if data.get("notes") else [])


@formatter("domain_merge", "domain + language merge study: the vocabulary carried into a second language")
def domain_merge(data: Mapping) -> Lines:
    cols = ("vocab_accuracy_lang2", "vocab_accuracy_lang1", "general", "general_lang2")
    return table(
        ["model", "vocab (lang2, never trained)", "vocab (lang1)", "general (lang1)", "general (lang2)", "seeds"],
        ([row.get("method"), *(seed_stat(row, c) for c in cols), num(row.get("seeds"))]
         for row in [*data.get("references", []), *data.get("rows", [])]),
    )


@formatter("harness", "graftline's exact match beside lm-evaluation-harness's, on the demo's models")
def harness(data: Mapping) -> Lines:
    rows = data.get("rows", [])
    lines = [f"Agree to within one example on every row: {data.get('target_met')}.", ""]
    return lines + table(
        ["model", "task", "graftline", "lm-eval", "examples", "completions differing", "graftline s", "lm-eval s"],
        ([r.get("model"), r.get("task"), num(r.get("graftline_exact_match")), num(r.get("lm_eval_exact_match")),
          num(r.get("examples")), num(r.get("differing_examples")), num(r.get("graftline_seconds"), 2),
          num(r.get("lm_eval_seconds"), 2)] for r in rows))


@formatter("plan", "`graft plan`: each stage's peak memory per worker, for real model sizes")
def plan(data: Mapping) -> Lines:
    node = data.get("node", {})
    lines = [f"LoRA, ZeRO-3, bf16 on a node of {num(node.get('gpus'))} × {num(node.get('gpu_gb'))} GB GPUs "
             "(`compute.accelerator: cuda`).", ""]
    return lines + table(
        ["model", "params", "stage", "ZeRO", "GPUs", "peak GB / worker", "host GB / worker", "fits 80 GB"],
        ([r.get("model"), f"{r.get('params', 0) / 1e9:.2f}B", r.get("stage"), num(r.get("zero_stage")), num(r.get("gpus")),
          num(r.get("peak_gb_per_worker"), 2), num(r.get("host_gb_per_worker"), 2), r.get("fits_80gb")]
         for r in data.get("rows", [])))


UX_ROWS = (
    ("progress_lines_during_train", "progress lines printed while training", 0),
    ("max_silence_s", "longest silence on the console (s)", 1),
    ("summary_width", "widest line of the final summary (characters)", 0),
    ("mlflow_children_in_order", "child runs in pipeline order at the `graft ui` link", 0),
    ("loss_chart_in_ui", "every train run's train_loss chart drawn", 0),
    ("eval_table_in_ui", "eval_table.json shown as a grid, models × skills", 0),
    ("submit_default_python_ok", "`graft submit` with no --python succeeded on a local head", 0),
)


@formatter("ux", "what a user sees: the demo's console, the MLflow UI in a browser, `graft submit` with no --python")
def ux(data: Mapping) -> Lines:
    notes = data.get("notes") if isinstance(data.get("notes"), Mapping) else {}
    lines = table(["what", "value"], ([what, num(data.get(key), digits)] for key, what, digits in UX_ROWS if key in data))
    if data.get("submit_default_python_ok") is None and notes.get("submit_default_python_ok"):
        lines += [f"`graft submit`: {notes['submit_default_python_ok']}.", ""]
    by_stage = data.get("max_silence_by_stage_s")
    if isinstance(by_stage, Mapping) and by_stage:
        lines += ["Longest silence on the console within each stage (s):", ""]
        lines += table(list(by_stage), [[num(v, 1) for v in by_stage.values()]])
    shots = [s for s in data.get("screenshots", []) if isinstance(s, Mapping)]
    if shots:  # taken outside the repository: named, not linked
        lines += ["Screenshots taken (not committed):", ""] + [f"- `{Path(str(s.get('path', ''))).name}`: {s.get('shows', '')}"
                                                              for s in shots] + [""]
    return lines


def generic(data: Mapping) -> Lines:
    """Any result without a formatter: its leaf values (nested dicts flattened to dotted keys; lists left out)."""

    def leaves(d: Mapping, prefix: str = "") -> Iterable[tuple[str, Any]]:
        for key, value in d.items():
            if isinstance(value, Mapping):
                yield from leaves(value, f"{prefix}{key}.")
            elif not isinstance(value, list):
                yield f"{prefix}{key}", value

    rows = list(leaves({k: v for k, v in data.items() if k != "provenance"}))
    return table(["key", "value"], rows) if rows else ["(no values to show)", ""]


# ---------------------------------------------------------------- the page


def provenance_lines(prov: Any) -> Lines:
    """Where the result came from, and the command that wrote it; or that it has no provenance."""
    if not isinstance(prov, Mapping):
        return ["**no provenance: not a claim of main**", ""]
    commit = str(prov.get("commit", MISSING))
    dirty = prov.get("dirty")
    tree = "**dirty tree**" if dirty else "clean tree" if dirty is False else f"dirty flag {MISSING}"
    seeds = prov.get("seeds")
    seed_text = ", ".join(map(str, seeds)) if isinstance(seeds, list) and seeds else MISSING
    wall = prov.get("wall_seconds")
    wall_text = f"{wall:.1f} s" if _is_number(wall) else MISSING
    return [f"Provenance: commit `{commit[:7]}`, {tree}, seeds {seed_text}, wall {wall_text}, "
            f"{prov.get('machine', MISSING)}, finished {prov.get('finished', MISSING)}.  ",
            f"Command: {code(str(prov.get('command', MISSING)))}", ""]


def section(stem: str, data: Mapping, results_dir: Path) -> Lines:
    """One result's section: title, provenance, its table(s), its figure."""
    kind = FORMATTERS.get(stem)
    lines = [f"## {stem}" + (f": {kind.title}" if kind else ""), "", f"From `{stem}.json`.", ""]
    lines += provenance_lines(data.get("provenance"))
    lines += kind.render(data) if kind else generic(data)
    if (results_dir / f"{stem}.png").is_file():
        lines += [f"![{stem}]({stem}.png)", ""]
    return lines


def load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def render(results_dir: Path) -> str:
    """REPORT.md for every `*.json` in `results_dir`, in file-name order."""
    results_dir = Path(results_dir)
    results = [(p.stem, load(p)) for p in sorted(results_dir.glob("*.json"), key=lambda p: p.name)]
    lines = ["# Benchmark results", "",
             f"Generated by `{COMMAND}` from the results JSONs in this folder. Do not edit it by hand: rerun the script "
             "after a result changes (`tests/test_results_provenance.py` fails while this page is stale).", "",
             "Each section gives a result's provenance and the exact command that wrote it, its headline numbers beside "
             "their baselines (accuracies and rates 0..1, 3 decimals; mean [min, max] over seeds where the result keeps "
             "them) and its figure. A result without provenance is not a claim of main.", ""]
    lines += table(["result", "provenance"],
                   ([f"`{stem}.json`",
                     f"commit `{str(data['provenance'].get('commit', MISSING))[:7]}`" if isinstance(data.get("provenance"), Mapping)
                     else "none"] for stem, data in results))
    for stem, data in results:
        lines += section(stem, data, results_dir)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of results JSONs (default: benchmarks/results)")
    p.add_argument("--out", type=Path, default=None, help="the report to write (default: RESULTS/REPORT.md)")
    args = p.parse_args(argv)
    out = args.out if args.out is not None else args.results / REPORT
    out.write_text(render(args.results), encoding="utf-8")
    print(out)


if __name__ == "__main__":
    main()
