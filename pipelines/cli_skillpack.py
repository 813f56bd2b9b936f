"""`graft pack`, `graft inspect`, `graft apply`, `graft remove`: SkillPacks from the command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_BAD_INPUT = 2


def _refuse(e: Exception) -> int:
    print(f"graft: error: {e}", file=sys.stderr)
    return EXIT_BAD_INPUT


def cmd_pack(args: argparse.Namespace) -> int:
    from graft.checkpoint import CheckpointError
    from graft.expert_packing import pack_expert
    from graft.importance import load_scores
    from graft.lora import read_lora_deltas
    from graft.skillpack import PackSettings, SkillPackError

    try:
        deltas = read_lora_deltas(args.adapter)
        settings = PackSettings(energy=args.energy, bits=tuple(args.bits), band_fractions=tuple(args.band_fractions),
                                budget=args.budget, quantizer=args.quantizer, weighted_svd=args.weighted_svd, allocation=args.allocation)
        if (settings.needs_calibration or args.tune_steps) and not args.calibration_data:
            raise ValueError(f"--quantizer {args.quantizer}{' --weighted-svd' if args.weighted_svd else ''}"
                             f"{f' --tune-steps {args.tune_steps}' if args.tune_steps else ''}: needs --calibration-data")
        batches = None
        if args.calibration_data:
            batches = _labelled_batches(args.tokenizer or args.base, args.calibration_data, args.calibration_examples, args.max_length, 32)
        source = {"adapter": str(Path(args.adapter).resolve()), "base": str(Path(args.base).resolve())}
        pack = pack_expert(args.skill or Path(args.adapter).name, args.base, args.adapter, deltas, settings, calibration_batches=batches,
                           importance=load_scores(args.importance) if args.importance else None, source=source,
                           tune_steps=args.tune_steps, tune_lr=args.tune_lr)
        pack.save(args.out)
    except (CheckpointError, SkillPackError, ValueError, KeyError, OSError) as e:
        return _refuse(e)
    m = pack.manifest
    print(f"{args.out}: {len(m['tensors'])} tensors, {m['total_bytes']} bytes "
          f"({m['total_bytes'] / m['delta_bf16_bytes']:.3f} of the bf16 delta)")
    return 0


def _labelled_batches(tokenizer: str, data: str, examples: int, max_length: int, batch_size: int) -> list:
    """The first `examples` prompt/answer rows of `data`, tokenized and collated (answers labelled)."""
    from transformers import AutoTokenizer

    from graft.data import labelled_batches, read_jsonl

    return labelled_batches(AutoTokenizer.from_pretrained(tokenizer), read_jsonl(data)[:examples], max_length, batch_size)


def cmd_score(args: argparse.Namespace) -> int:
    """Importance scores of an expert (base + adapter) on its data, in one process (the score stage fans this out)."""
    import json

    from graft.atomic import atomic_dir
    from graft.checkpoint import CheckpointError
    from graft.importance import SCORES, module_summary, save_scores
    from graft.lora import load_with_adapter

    try:
        score = SCORES.get(args.method)
        batches = _labelled_batches(args.tokenizer or args.base, args.data, args.examples, args.max_length, args.batch_size)
        partial = score(load_with_adapter(args.base, args.adapter), batches)
        scores = partial.finalize()
        summary = module_summary(scores)
        with atomic_dir(args.out) as tmp:
            save_scores(scores, tmp / "scores.safetensors", args.method, partial.count)
            (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    except (CheckpointError, ValueError, KeyError, OSError) as e:
        return _refuse(e)
    top = ", ".join(f"{k} {v['share']:.3f}" for k, v in list(summary.items())[:3])
    print(f"{args.out}/scores.safetensors: {args.method} over {partial.count} terms; largest shares: {top}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from graft.skillpack import SkillPack, SkillPackError
    from pipelines.report import format_table

    try:
        pack = SkillPack.load(args.pack)
    except (SkillPackError, OSError, ValueError) as e:
        return _refuse(e)
    m = pack.manifest
    rows = []
    for key, e in m["tensors"].items():
        bits = "/".join(str(b["bits"]) for b in e.get("bands", [])) or ("fp16" if e["scheme"] != "svd_quant" else "-")
        rows.append([key, e["scheme"], "x".join(map(str, e["shape"])), str(e.get("rank", e.get("kept", "-"))), bits,
                     e.get("quantizer", "rtn") if e["scheme"] == "svd_quant" else "-", str(e["bytes"]),
                     f"{e['bytes'] / e['bf16_bytes']:.3f}"])
    print(f"SkillPack {m['skill']!r} (format v{m['format_version']}), base {m['base_fingerprint']['architecture']}")
    print(format_table(["tensor", "scheme", "shape", "rank/kept", "bits", "rounding", "bytes", "of bf16"], rows))
    print(f"total: {m['total_bytes']} bytes = {m['total_bytes'] / m['delta_bf16_bytes']:.4f} of the bf16 delta "
          f"({m['delta_bf16_bytes']} bytes)")
    if "grid_tuning" in m:
        g = m["grid_tuning"]
        print(f"grids tuned to the expert: KL {g['kl_before']:.4g} -> {g['kl_after']:.4g} on answer tokens ({g['steps']} passes)")
    return 0


def _graft(args: argparse.Namespace, sign: float, allow_drift: bool) -> int:
    from graft.checkpoint import CheckpointError
    from graft.grafting import graft
    from graft.skillpack import SkillPack, SkillPackError

    try:
        packs = [SkillPack.load(p) for p in args.packs]
        report = graft(args.model, packs, args.out, scales=[sign * args.scale] * len(packs), allow_base_drift=allow_drift)
    except (CheckpointError, SkillPackError, ValueError, OSError) as e:
        return _refuse(e)
    drifted = [name for name, d in report["base_drift"].items() if d]
    if drifted and sign > 0:
        print(f"warning: base drift for {', '.join(drifted)} (applied anyway, as asked)", file=sys.stderr)
    print(f"{args.out}: {'grafted' if sign > 0 else 'removed'} {', '.join(report['packs'])}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Build a routed model (graft.routing) over packs from example prompts per skill, and save it."""
    import random

    from graft.checkpoint import CheckpointError
    from graft.data import read_jsonl
    from graft.routing import NONE, build_routed, prompt_features
    from graft.skillpack import SkillPack, SkillPackError

    try:
        packs = [SkillPack.load(p) for p in args.packs]
        files = dict(_name_and_path(item) for item in args.prompts)
        needed = [p.name for p in packs] + [NONE]
        missing, extra = [n for n in needed if n not in files], [n for n in files if n not in needed]
        if missing or extra:
            raise ValueError(f"--prompts needs exactly one file for each pack's skill and for {NONE!r}: "
                             f"missing {missing}, not a pack {extra}")
        rng = random.Random(args.seed)
        train, held = {}, {}
        for name in needed:
            prompts = [r["prompt"] for r in read_jsonl(files[name])]
            rng.shuffle(prompts)
            prompts = prompts[: args.examples]
            cut = len(prompts) - (len(prompts) // 5 if len(prompts) >= 5 else 0)
            train[name], held[name] = prompts[:cut], prompts[cut:]
        routed = build_routed(args.model, packs, train, hard=not args.soft, allow_base_drift=args.allow_base_drift,
                              seed=args.seed, tokenizer=args.tokenizer)
        tok = _left_padded_tokenizer(args.tokenizer or args.model)
        for name, prompts in held.items():
            if prompts:
                picked = routed.router.logits(prompt_features(routed, tok, prompts, routed.router.layer)).argmax(-1)
                right = sum(routed.router.classes[i] == name for i in picked.tolist())
                print(f"  router on held-out {name!r} prompts: {right}/{len(prompts)} sent to {name!r}")
        routed.save(args.out)
    except (CheckpointError, SkillPackError, ValueError, OSError) as e:
        return _refuse(e)
    print(f"{args.out}: routed model over {', '.join(p.name for p in packs)} (load with graft.routing.RoutedModel.load)")
    return 0


def _name_and_path(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--prompts {item!r}: expected SKILL=FILE.jsonl")
    return name, path


def _left_padded_tokenizer(folder: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    return tok


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from graft.adapter_merge import merge_adapters
    from graft.checkpoint import CheckpointError

    try:
        report = merge_adapters(args.adapters, args.out, method=args.method, weights=args.weights, density=args.density,
                                rank=args.rank, seed=args.seed)
    except (CheckpointError, KeyError, ValueError, OSError) as e:
        return _refuse(e)
    print(f"{args.out}: one LoRA adapter, rank {report['rank']}, {report['tensors']} modules ({args.method})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge-adapters", help="merge several LoRA adapters into one adapter (base untouched)")
    m.add_argument("adapters", nargs="+", help="PEFT LoRA adapter folders")
    m.add_argument("--out", required=True)
    m.add_argument("--method", default="ties", help="linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune")
    m.add_argument("--weights", type=float, nargs="+", help="one per adapter (default 1.0 each)")
    m.add_argument("--density", type=float, default=1.0)
    m.add_argument("--rank", type=int, help="rank of the merged adapter (default: the largest input rank)")
    m.add_argument("--seed", type=int, default=0, help="for DARE's random drop")
    m.set_defaults(fn=cmd_merge_adapters)

    p = sub.add_parser("pack", help="pack a LoRA adapter into a SkillPack")
    p.add_argument("adapter", help="PEFT LoRA adapter folder")
    p.add_argument("--base", required=True, help="the base checkpoint folder the adapter was trained on")
    p.add_argument("--out", required=True)
    p.add_argument("--skill", help="skill name (default: the adapter folder's name)")
    p.add_argument("--energy", type=float, default=0.99, help="β: fraction of Σσ² the kept rank holds")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--band-fractions", type=float, nargs="+", default=[0.5, 0.5])
    p.add_argument("--budget", type=float, help="at most this fraction of the bf16 delta's bytes (ranks allocated across matrices; "
                   "replaces --energy), e.g. 0.0667 for 1/15")
    p.add_argument("--allocation", default="energy", help="with --budget, what a direction is worth: energy, importance or "
                   "energy_importance (the last two read --importance)")
    p.add_argument("--importance", help="the skill's importance scores (scores.safetensors of the score stage)")
    p.add_argument("--quantizer", default="rtn", help="rtn (round to nearest) or gptq (needs --calibration-data)")
    p.add_argument("--weighted-svd", action="store_true", help="SVD weighted by input-channel RMS (needs --calibration-data)")
    p.add_argument("--calibration-data", help="JSONL of prompt/answer rows the expert was trained on (calibration)")
    p.add_argument("--calibration-examples", type=int, default=256, help="rows of --calibration-data used")
    p.add_argument("--max-length", type=int, default=64, help="tokens per calibration row")
    p.add_argument("--tune-steps", type=int, default=0, help="grid tuning passes over the calibration data: each column's "
                   "grid fitted so base + pack matches the expert's answers (same bytes; needs --calibration-data)")
    p.add_argument("--tune-lr", type=float, default=0.003)
    p.add_argument("--tokenizer", help="tokenizer folder for the calibration data (default: --base)")
    p.set_defaults(fn=cmd_pack)

    sc = sub.add_parser("score", help="importance scores of an expert (base + LoRA adapter) on its data")
    sc.add_argument("adapter", help="PEFT LoRA adapter folder")
    sc.add_argument("--base", required=True)
    sc.add_argument("--data", required=True, help="JSONL of prompt/answer rows")
    sc.add_argument("--out", required=True, help="folder for scores.safetensors and summary.json")
    sc.add_argument("--method", default="fisher", help="fisher, snip or magnitude")
    sc.add_argument("--examples", type=int, default=256)
    sc.add_argument("--batch-size", type=int, default=1, help="examples per gradient; 1 = per-example Fisher")
    sc.add_argument("--max-length", type=int, default=64)
    sc.add_argument("--tokenizer", help="tokenizer folder (default: --base)")
    sc.set_defaults(fn=cmd_score)

    i = sub.add_parser("inspect", help="table of a SkillPack's modules, schemes, ranks, bits and bytes")
    i.add_argument("pack")
    i.set_defaults(fn=cmd_inspect)

    a = sub.add_parser("apply", help="graft SkillPacks into a base and write a checkpoint")
    a.add_argument("model", help="base checkpoint folder")
    a.add_argument("packs", nargs="+")
    a.add_argument("--out", required=True)
    a.add_argument("--scale", type=float, default=1.0)
    a.add_argument("--allow-base-drift", action="store_true", help="apply to a base whose weights differ from the pack's")
    a.set_defaults(fn=lambda args: _graft(args, 1.0, args.allow_base_drift))

    rt = sub.add_parser("route", help="a routed model: packs applied on the fly, chosen per prompt by a small router")
    rt.add_argument("model", help="base checkpoint folder")
    rt.add_argument("packs", nargs="+")
    rt.add_argument("--out", required=True)
    rt.add_argument("--prompts", nargs="+", required=True, metavar="SKILL=FILE.jsonl",
                    help="example prompts (JSONL prompt/answer rows) for each pack's skill, and none=FILE for prompts "
                    "that stay on the base")
    rt.add_argument("--examples", type=int, default=400, help="prompts used per class (a fifth held out to check the router)")
    rt.add_argument("--soft", action="store_true", help="weight packs by the router's probabilities instead of picking one")
    rt.add_argument("--seed", type=int, default=0)
    rt.add_argument("--tokenizer", help="tokenizer folder (default: the base folder)")
    rt.add_argument("--allow-base-drift", action="store_true")
    rt.set_defaults(fn=cmd_route)

    r = sub.add_parser("remove", help="ungraft SkillPacks from a grafted checkpoint")
    r.add_argument("model", help="grafted checkpoint folder")
    r.add_argument("packs", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--scale", type=float, default=1.0, help="the scale the packs were grafted with")
    r.set_defaults(fn=lambda args: _graft(args, -1.0, True))
