"""`graft transplant`: make a ConTrans concept transplant from two models on disk, with no pipeline run.

The concept vector is taken in --source on --pairs (JSONL rows with positive/negative texts, or
prompt/answer/negative), mapped into --target by an affine map fitted on --prompts (JSONL with a `prompt`
field) and both sides of the pairs (80% fit, 20% held-out R²; --map-prompts-only leaves the pairs out), and saved
with --layer and --alpha as a transplant folder that loads only
onto --target (`graft.transplant.Transplant`). Bad input is one line and exit 2, before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_transplant(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graft.atomic import check_output
    from graft.checkpoint import weight_files
    from graft.data import read_jsonl
    from graft.transplant import (VECTORS, Transplant, TransplantError, check_layer, concept_vectors, config_depth,
                                  decoder_layers, fit_affine, last_token_states, model_fingerprint, pair_texts, same_depth,
                                  with_pairs)

    inputs = [args.source, args.target, args.pairs, args.prompts]
    check_output(args.out, overwrite=args.overwrite, inputs=inputs)
    VECTORS.check(args.vector)
    pos, neg = pair_texts(read_jsonl(args.pairs, fields=())[:args.max_pairs], args.pairs)
    prompts = [r["prompt"] for r in read_jsonl(args.prompts, fields=("prompt",))[:args.max_prompts]]
    if len(prompts) < 5:
        raise TransplantError(f"{args.prompts}: {len(prompts)} prompts with a `prompt` field; the affine map needs at least 5")

    n_source, n_target = config_depth(args.source), config_depth(args.target)  # checked before any weight is loaded
    for flag, layer, n in (("--layer", args.layer, n_target), ("--source-layer", args.source_layer, n_source)):
        if layer is not None and n is not None and not 0 <= layer < n:
            raise TransplantError(f"{flag} {layer} is out of range: the model has decoder layers 0..{n - 1}")

    def load(folder: str):
        weight_files(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=args.trust_remote_code).eval()
        return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=args.trust_remote_code)

    source, source_tok = load(args.source)
    target, target_tok = load(args.target)
    layer = check_layer(target, args.layer, "--layer")
    source_layer = check_layer(source, args.source_layer if args.source_layer is not None else
                               same_depth(layer, len(decoder_layers(target)), len(decoder_layers(source))), "--source-layer")
    source_pos, source_neg = last_token_states(source, source_tok, pos), last_token_states(source, source_tok, neg)
    vectors = concept_vectors(source_pos, source_neg, args.vector)
    xs, ys = last_token_states(source, source_tok, prompts), last_token_states(target, target_tok, prompts)
    if not args.map_prompts_only:
        xs = with_pairs(xs, source_pos, source_neg)
        ys = with_pairs(ys, last_token_states(target, target_tok, pos), last_token_states(target, target_tok, neg))
    amap = fit_affine(xs[source_layer], ys[layer])
    direction = amap.direction(vectors[source_layer])
    info = {"source_layer": source_layer, "affine_r2_heldout": amap.r2_heldout, "vector": args.vector, "pairs": len(pos),
            "prompts": len(prompts)}
    Transplant(direction, layer, args.alpha, model_fingerprint(args.target), model_fingerprint(args.source), info).save(
        args.out, overwrite=args.overwrite)
    print(f"{args.out}: concept vector from {Path(args.source).name} layer {source_layer} into {Path(args.target).name} "
          f"layer {layer} at α={args.alpha:g} (affine map held-out R² {amap.r2_heldout:.3f}, |v| {float(direction.norm()):.3f})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("transplant", help="make a ConTrans concept transplant: a source model's concept vector mapped into "
                                          "a target layer (a folder that loads only onto the target)")
    t.add_argument("--source", required=True, help="the aligned model (a checkpoint folder)")
    t.add_argument("--target", required=True, help="the model to transplant into (a checkpoint folder)")
    t.add_argument("--pairs", required=True, help="JSONL of concept pairs: positive/negative texts, or prompt/answer/negative")
    t.add_argument("--prompts", required=True, help="JSONL of ordinary prompts (`prompt` field) both models read, for the map")
    t.add_argument("--layer", type=int, required=True, help="target decoder layer the vector is added to")
    t.add_argument("--source-layer", type=int, help="source layer of the vector (default: the same relative depth)")
    t.add_argument("--alpha", type=float, default=2.0, help="injection strength (default 2)")
    t.add_argument("--vector", default="mean", help="mean (of the pair differences) or pca (their first principal component)")
    t.add_argument("--map-prompts-only", action="store_true",
                   help="fit the affine map on --prompts alone (default: on --prompts and both sides of --pairs)")
    t.add_argument("--max-pairs", type=int, default=200)
    t.add_argument("--max-prompts", type=int, default=2000)
    t.add_argument("--out", required=True, help="the transplant folder (refused if it exists, unless --overwrite)")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it is a folder graftline wrote")
    t.add_argument("--trust-remote-code", action="store_true")
    t.set_defaults(fn=cmd_transplant)
