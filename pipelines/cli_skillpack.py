"""`graft pack | score | inspect | apply | route | remove | merge-adapters | keygen | verify`: SkillPacks from the command line.

Errors are not caught here: `pipelines.cli.main` turns every refusal into one line and exit 2.
Every command that writes takes `--out`, refuses an existing one unless `--overwrite` (and then only a
folder graftline wrote), and never writes over one of its own inputs (`graft.atomic`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipelines.cli import digest_cache


def _inputs(*paths: str | None) -> list[str]:
    return [p for p in paths if p]


def _check_out(args: argparse.Namespace, *inputs: str | None) -> None:
    """Refuse `--out` before any work is done (the atomic write checks again when it commits)."""
    from graft.atomic import check_output

    check_output(args.out, overwrite=args.overwrite, inputs=_inputs(*inputs))


def _load_packs(folders: list[str], verify_key: str | None) -> list:
    from graft.signing import verify_folder
    from graft.skillpack import SkillPack

    packs = []
    for folder in folders:
        if verify_key:
            verify_folder(folder, verify_key)
        packs.append(SkillPack.load(folder))
    return packs


def cmd_pack(args: argparse.Namespace) -> int:
    from graft.expert_packing import pack_expert
    from graft.experts import Expert
    from graft.importance import load_scores
    from graft.skillpack import PackSettings

    inputs = (args.expert, args.base, args.importance, args.calibration_data, args.tokenizer)
    _check_out(args, *inputs)
    expert = Expert(Path(args.expert), args.kind)
    deltas = expert.deltas(args.base)
    settings = PackSettings(energy=args.energy, bits=tuple(args.bits), band_fractions=tuple(args.band_fractions),
                            keep_fraction=args.keep_fraction,
                            budget=args.budget, quantizer=args.quantizer, weighted_svd=args.weighted_svd, allocation=args.allocation)
    if (settings.needs_calibration or args.tune_steps) and not args.calibration_data:
        raise ValueError(f"--quantizer {args.quantizer}{' --weighted-svd' if args.weighted_svd else ''}"
                         f"{f' --tune-steps {args.tune_steps}' if args.tune_steps else ''}: needs --calibration-data")
    batches = None
    if args.calibration_data:
        batches = _labelled_batches(args.tokenizer or args.base, args.calibration_data, args.calibration_examples, args.max_length, 32)
    source = {"expert": str(Path(args.expert).resolve()), "expert_kind": args.kind, "base": str(Path(args.base).resolve())}
    pack = pack_expert(args.skill or Path(args.expert).name, args.base, expert, deltas, settings, calibration_batches=batches,
                       importance=load_scores(args.importance) if args.importance else None, source=source,
                       tune_steps=args.tune_steps, tune_lr=args.tune_lr)
    pack.save(args.out, overwrite=args.overwrite, inputs=_inputs(*inputs), sign_with=args.sign)
    m = pack.manifest
    print(f"{args.out}: {len(m['tensors'])} tensors, {m['total_bytes']} bytes "
          f"({m['total_bytes'] / m['delta_bf16_bytes']:.3f} of the bf16 delta)")
    for warning in m.get("warnings", []):  # what the pack could not do as asked, also in its manifest
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _labelled_batches(tokenizer: str, data: str, examples: int, max_length: int, batch_size: int) -> list:
    """The first `examples` prompt/answer rows of `data`, tokenized and collated (answers labelled)."""
    from transformers import AutoTokenizer

    from graft.data import labelled_batches, read_jsonl

    return labelled_batches(AutoTokenizer.from_pretrained(tokenizer), read_jsonl(data)[:examples], max_length, batch_size)


def cmd_score(args: argparse.Namespace) -> int:
    """Importance scores of an expert on its data, in one process (the score stage fans this out)."""
    import json

    from graft.atomic import atomic_dir
    from graft.experts import Expert
    from graft.importance import SCORES, module_summary, save_scores

    inputs = _inputs(args.expert, args.base, args.data, args.tokenizer)
    _check_out(args, *inputs)
    score = SCORES.get(args.method)
    expert = Expert(Path(args.expert), args.kind)
    model = expert.load(args.base)
    batches = _labelled_batches(args.tokenizer or args.base, args.data, args.examples, args.max_length, args.batch_size)
    partial = score(model, batches, expert.touches(args.base))  # what a SkillPack of this expert can touch
    scores = partial.finalize()
    summary = module_summary(scores)
    with atomic_dir(args.out, overwrite=args.overwrite, inputs=inputs, kind="scores") as tmp:
        save_scores(scores, tmp / "scores.safetensors", args.method, partial.count)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    top = ", ".join(f"{k} {v['share']:.3f}" for k, v in list(summary.items())[:3])
    print(f"{args.out}/scores.safetensors: {args.method} over {partial.count} terms; largest shares: {top}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from graft.routing import is_routed

    if is_routed(args.pack):
        return _inspect_routed(Path(args.pack))
    from graft.skillpack import SkillPack
    from pipelines.report import format_table

    pack = SkillPack.load(args.pack)
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


def _inspect_routed(folder: Path) -> int:
    """A routed folder, checked as a load would check it (schema, hash, checksums, packs, base fingerprint)."""
    from graft.checkpoint import CheckpointReader
    from graft.fingerprint import compare
    from graft.routing import read_routed_manifest
    from graft.skillpack import SkillPack

    meta = read_routed_manifest(folder)
    packs = [SkillPack.load(folder / "packs" / name) for name in meta.packs]
    problems, drifted = compare(meta.base_fingerprint.model_dump(), CheckpointReader(meta.base), digest_cache())
    state = problems[0] if problems else (f"drifted (tensor {drifted[0]!r} changed)" if drifted else "unchanged")
    print(f"routed model over {', '.join(p.name for p in packs)}; router classes {meta.router.classes} "
          f"(layer {meta.router.layer}, {'hard' if meta.router.hard else 'soft'}); base {meta.base}: {state}")
    for pack in packs:
        print(f"  {pack.name}: {len(pack.keys())} tensors, {pack.manifest['total_bytes']} bytes")
    return 0


def _graft(args: argparse.Namespace, sign: float, allow_drift: bool) -> int:
    from graft.grafting import graft

    _check_out(args, args.model, *args.packs)
    packs = _load_packs(args.packs, getattr(args, "verify", None))
    report = graft(args.model, packs, args.out, scales=[sign * args.scale] * len(packs), allow_base_drift=allow_drift,
                   overwrite=args.overwrite, cache=digest_cache())
    drifted = [name for name, d in report["base_drift"].items() if d]
    if drifted and sign > 0:
        print(f"warning: base drift for {', '.join(drifted)} (applied anyway, as asked)", file=sys.stderr)
    print(f"{args.out}: {'grafted' if sign > 0 else 'removed'} {', '.join(report['packs'])}")
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Build a routed model (graft.routing) over packs from example prompts per skill, and save it."""
    import random

    from graft.data import read_jsonl
    from graft.routing import NONE, build_routed, prompt_features

    files = dict(_name_and_path(item) for item in args.prompts)
    _check_out(args, args.model, args.tokenizer, *args.packs, *files.values())
    packs = _load_packs(args.packs, args.verify)
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
                          seed=args.seed, tokenizer=args.tokenizer, digest_cache=digest_cache())
    tok = _left_padded_tokenizer(args.tokenizer or args.model)
    for name, prompts in held.items():
        if prompts:
            picked = routed.router.logits(prompt_features(routed, tok, prompts, routed.router.layer)).argmax(-1)
            right = sum(routed.router.classes[i] == name for i in picked.tolist())
            print(f"  router on held-out {name!r} prompts: {right}/{len(prompts)} sent to {name!r}")
    routed.save(args.out, overwrite=args.overwrite, sign_with=args.sign)
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


def _expert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("expert", help="the expert: a PEFT LoRA adapter folder, or with --kind full a fine-tuned checkpoint of --base")
    parser.add_argument("--kind", default="lora",
                        help="lora: a LoRA adapter on --base; sparse: a sparse (SHiRA) adapter on --base; full: a fully fine-tuned "
                             "checkpoint (its delta is taken against --base)")


def cmd_port(args: argparse.Namespace) -> int:
    """PortLLM: a patch (an expert trained on --from) applied to the newer base --to, with no training: a checkpoint + port.json."""
    import json
    import shutil

    from graft.atomic import atomic_dir
    from graft.experts import Expert
    from graft.model_checks import check_checkpoint
    from graft.loading import LoadOptions
    from graft.port import base_drift, check_fits, ported_model

    inputs = _inputs(args.patch, args.old, args.new)
    _check_out(args, *inputs)
    deltas = Expert(Path(args.patch), args.kind).deltas(args.old)
    check_fits(deltas, args.new)
    drift = base_drift(args.old, args.new, list(deltas))
    model = ported_model(args.new, deltas, options=LoadOptions(trust_remote_code=args.trust_remote_code))
    with atomic_dir(args.out, overwrite=args.overwrite, inputs=inputs, kind="ported") as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for f in Path(args.new).iterdir():  # the new base's tokenizer files
            if f.is_file() and f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy2(f, tmp / f.name)
        (tmp / "port.json").write_text(json.dumps({"patch": str(Path(args.patch).resolve()), "kind": args.kind,
                                                   "old_base": str(Path(args.old).resolve()), "new_base": str(Path(args.new).resolve()),
                                                   "drift": drift}, indent=1))
        check_checkpoint(tmp, args.new, trust_remote_code=args.trust_remote_code)
    worst = max(drift, key=drift.get)
    print(f"{args.out}: {args.new} + the patch ({len(deltas)} tensors); base drift under it: mean "
          f"{sum(drift.values()) / len(drift):.4f}, largest {drift[worst]:.4f} ({worst})")
    return 0


def cmd_merge_adapters(args: argparse.Namespace) -> int:
    from graft.adapter_merge import merge_adapters

    _check_out(args, *args.adapters)
    report = merge_adapters(args.adapters, args.out, method=args.method, weights=args.weights, density=args.density,
                            rank=args.rank, seed=args.seed, overwrite=args.overwrite)
    print(f"{args.out}: one LoRA adapter, rank {report['rank']}, {report['tensors']} modules ({args.method})")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    from graft.signing import generate_keypair

    private, public = Path(args.out) / f"{args.name}.key", Path(args.out) / f"{args.name}.pub"
    generate_keypair(private, public)
    print(f"{private}: private key (keep it secret; `graft pack --sign {private}`)\n"
          f"{public}: public key (hand it out; `graft apply --verify {public}`)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Signature first (who made it), then the folder's own schema and checksums (that it is whole)."""
    from graft.routing import is_routed, read_routed_manifest
    from graft.signing import verify_folder
    from graft.skillpack import SkillPack

    folder = Path(args.folder)
    verify_folder(folder, args.key)
    if is_routed(folder):
        for name in read_routed_manifest(folder).packs:
            SkillPack.load(folder / "packs" / name)
        what = "routed model"
    else:
        SkillPack.load(folder)
        what = "SkillPack"
    print(f"{folder}: {what} signed by the owner of {args.key}; every file checks")
    return 0


def _writes(parser: argparse.ArgumentParser, help_out: str) -> None:
    parser.add_argument("--out", required=True, help=help_out + " (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --out if it is a folder graftline wrote (never a folder it did not write, nor an input)")


def register(sub: argparse._SubParsersAction) -> None:
    kg = sub.add_parser("keygen", help="make a key pair for signing SkillPacks and routed models (PEM, P-256)")
    kg.add_argument("--out", default=".", help="folder for NAME.key and NAME.pub (default: here)")
    kg.add_argument("--name", default="graftline", help="file name stem (default: graftline)")
    kg.set_defaults(fn=cmd_keygen)

    vf = sub.add_parser("verify", help="check a signed SkillPack or routed-model folder against a public key")
    vf.add_argument("folder")
    vf.add_argument("--key", required=True, help="public key (PEM) of the signer")
    vf.set_defaults(fn=cmd_verify)

    m = sub.add_parser("merge-adapters", help="merge several LoRA adapters into one adapter (base untouched)")
    m.add_argument("adapters", nargs="+", help="PEFT LoRA adapter folders")
    _writes(m, "the merged adapter folder")
    m.add_argument("--method", default="ties", help="linear, task_arithmetic, ties, dare_linear, dare_ties, magnitude_prune")
    m.add_argument("--weights", type=float, nargs="+", help="one per adapter (default 1.0 each)")
    m.add_argument("--density", type=float, default=1.0)
    m.add_argument("--rank", type=int, help="rank of the merged adapter (default: the largest input rank)")
    m.add_argument("--seed", type=int, default=0, help="for DARE's random drop")
    m.set_defaults(fn=cmd_merge_adapters)

    po = sub.add_parser("port", help="apply a patch trained on one base version to a newer version, with no training (PortLLM)")
    po.add_argument("patch", help="the patch: a PEFT LoRA adapter folder, or with --kind full a fine-tuned checkpoint of --from")
    po.add_argument("--kind", default="lora", help="lora, sparse or full (see `graft pack --kind`)")
    po.add_argument("--from", dest="old", required=True, help="the base the patch was trained on")
    po.add_argument("--to", dest="new", required=True, help="the newer base to carry it to")
    _writes(po, "the ported checkpoint folder (+ port.json: the base's drift under the patch, per tensor)")
    po.add_argument("--trust-remote-code", action="store_true")
    po.set_defaults(fn=cmd_port)

    p = sub.add_parser("pack", help="pack an expert (a LoRA adapter, or a fully fine-tuned checkpoint) into a SkillPack")
    _expert_args(p)
    p.add_argument("--base", required=True, help="the base checkpoint folder the expert was trained from")
    _writes(p, "the SkillPack folder")
    p.add_argument("--sign", metavar="KEY", help="sign the pack with this private key (PEM; `graft keygen` makes one)")
    p.add_argument("--skill", help="skill name (default: the expert folder's name)")
    p.add_argument("--energy", type=float, default=0.99, help="β: fraction of Σσ² the kept rank holds")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    p.add_argument("--keep-fraction", type=float, default=0.1, help="α: fraction of each embedding / LM head delta's entries kept")
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

    sc = sub.add_parser("score", help="importance scores of an expert (base + LoRA adapter, or a fine-tuned checkpoint) on its data")
    _expert_args(sc)
    sc.add_argument("--base", required=True)
    sc.add_argument("--data", required=True, help="JSONL of prompt/answer rows")
    _writes(sc, "folder for scores.safetensors and summary.json")
    sc.add_argument("--method", default="fisher", help="fisher, snip or magnitude")
    sc.add_argument("--examples", type=int, default=256)
    sc.add_argument("--batch-size", type=int, default=1, help="examples per gradient; 1 = per-example Fisher")
    sc.add_argument("--max-length", type=int, default=64)
    sc.add_argument("--tokenizer", help="tokenizer folder (default: --base)")
    sc.set_defaults(fn=cmd_score)

    i = sub.add_parser("inspect", help="table of a SkillPack's modules, schemes, ranks, bits and bytes (or a routed model's packs)")
    i.add_argument("pack", help="a SkillPack or routed-model folder")
    i.set_defaults(fn=cmd_inspect)

    a = sub.add_parser("apply", help="graft SkillPacks into a base and write a checkpoint")
    a.add_argument("model", help="base checkpoint folder")
    a.add_argument("packs", nargs="+")
    _writes(a, "the grafted checkpoint folder")
    a.add_argument("--verify", metavar="PUBKEY", help="refuse packs not signed by this public key's owner")
    a.add_argument("--scale", type=float, default=1.0)
    a.add_argument("--allow-base-drift", action="store_true", help="apply to a base whose weights differ from the pack's")
    a.set_defaults(fn=lambda args: _graft(args, 1.0, args.allow_base_drift))

    rt = sub.add_parser("route", help="a routed model: packs applied on the fly, chosen per prompt by a small router")
    rt.add_argument("model", help="base checkpoint folder")
    rt.add_argument("packs", nargs="+")
    _writes(rt, "the routed-model folder")
    rt.add_argument("--verify", metavar="PUBKEY", help="refuse packs not signed by this public key's owner")
    rt.add_argument("--sign", metavar="KEY", help="sign the routed-model folder with this private key (PEM)")
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
    _writes(r, "the checkpoint folder without the packs")
    r.add_argument("--scale", type=float, default=1.0, help="the scale the packs were grafted with")
    r.set_defaults(fn=lambda args: _graft(args, -1.0, True))
