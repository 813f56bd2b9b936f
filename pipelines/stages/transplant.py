"""Stage `transplant`: the layer × α sweep of a concept transplant, and the transplant it chooses.

Reads `Datasets` and `Concepts`; writes `Transplanted` and `Report`; uses the `transplant` and `evaluate` sections.
ConTrans's second and third steps (methods.md §5, `graft.transplant`). For each swept target layer
(`transplant.target_layers`, default all) the source layer is `transplant.source_layer` or the one at the
same relative depth; an affine map between the two is fitted on the shared prompts' states (80% fit, 20%
held-out R²) and carries the source's concept vector into the target. Each (layer, α) point is an item
with its own MLflow child run (`transplant/L<layer>-a<α>`): the target's behaviour rate on the concept
skill's held-out prompts with α · v injected at every position, its `general` exact match with the
behaviour's marks taken off, and the same with a random direction of v's norm (the control). One Ray
task per target layer loads the target once and scores all its α. The chosen point has the highest
behaviour rate whose `general` is at most `transplant.max_general_drop` below α = 0 (the smallest α
on ties); it is saved as a `graft.transplant.Transplant` folder, which loads only onto that target.
Outputs: `<root>/transplant/L<l>-a<α>-<key>/point.json` per point, `<root>/transplant/report-<key>/`
(`eval.json`: {point: {behaviour_rate, general, random_behaviour_rate, affine_r2_heldout}},
`eval.txt`, `heatmap.png`: behaviour rate over layer × α) and `<root>/transplant/transplant-<key>/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.artifacts import Checkpoint, Concepts, Datasets, Report, Transplanted
from pipelines.cache import Ref, content_key
from pipelines.waiting import as_completed
from pipelines.context import Item, RunContext, StageResult
from pipelines.placement import Placement, placement
from pipelines.report import format_table
from pipelines.inputs import TESTBED
from pipelines.spec import EvaluateSpec, JobSpec, TransplantSpec

NAME = "transplant"
READS = (Datasets, Concepts)
WRITES = (Transplanted, Report)
SECTIONS = ("transplant", "evaluate")
REPORT_VERSION = 2  # what the report folder holds (the heatmap's panels); part of its key


@dataclass(frozen=True)
class SweepRequest:
    """Everything the sweep depends on; each point's content key is the hash of this and the point."""

    concepts: Ref
    target: Checkpoint
    prompts: Ref  # the concept skill's held-out split: its prompts show the behaviour or not
    general: Ref  # `general`'s held-out split
    settings: TransplantSpec
    evaluate: EvaluateSpec
    trust_remote_code: bool
    placement: Placement


def model_depth(name: str, spec: JobSpec) -> int | None:
    """Decoder layers of a model the job names, when known before anything runs: a testbed model's from its size, a
    local folder's from its config.json; None for a hub id (or a config without a layer count)."""
    from graft.testbed.models import SIZES
    from graft.testbed.recipes import LARGER
    from graft.transplant import config_depth

    if name.startswith(TESTBED):
        size = LARGER.get(spec.testbed.size, "large") if name == TESTBED + "target-large" else (
            "mini" if name == TESTBED + "source-hetero" else spec.testbed.size)
        return SIZES[size]["num_hidden_layers"]
    return config_depth(name)


def problems(spec: JobSpec) -> list[str]:
    """A swept target layer or the source layer out of the model's range, when the depth is known before anything runs."""
    tp, out = spec.transplant, []
    target, source = model_depth(tp.target, spec), model_depth(tp.source, spec)
    for layer in tp.target_layers or []:
        if target is not None and not 0 <= layer < target:
            out.append(f"transplant.target_layers: layer {layer} is out of range: {tp.target} has decoder layers 0..{target - 1}")
    if tp.source_layer is not None and source is not None and tp.source_layer >= source:
        out.append(f"transplant.source_layer: layer {tp.source_layer} is out of range: {tp.source} has decoder layers 0..{source - 1}")
    return out


def point_name(layer: int, alpha: float) -> str:
    return f"L{layer}-a{alpha:g}"


def score_layer(req: SweepRequest, layer: int, vector, control) -> dict[float, dict[str, float]]:
    """Behaviour rate and `general` at every α for one target layer, and the random control's behaviour (a Ray task)."""
    from transformers import AutoTokenizer

    from graft.data import read_jsonl
    from graft.loading import load_causal_lm
    from graft.transplant import steering_rates

    req.placement.enter()
    tp, ev = req.settings, req.evaluate
    model = load_causal_lm(req.target.model.path, req.placement.load_options(req.trust_remote_code)).eval()
    tok = AutoTokenizer.from_pretrained(req.target.tokenizer.path, trust_remote_code=req.trust_remote_code)
    prompts = [r["prompt"] for r in read_jsonl(req.prompts.path, fields=("prompt",))[:tp.examples]]
    general = read_jsonl(req.general.path)[:tp.examples]
    steered = steering_rates(model, tok, layer, vector, tp.alphas, prompts, general, tp.behaviour, ev.max_new_tokens, ev.batch_size)
    # the control needs only its behaviour, and at α = 0 it is the unsteered model already scored above
    random = steering_rates(model, tok, layer, control, [a for a in tp.alphas if a != 0], prompts, None, tp.behaviour,
                            ev.max_new_tokens, ev.batch_size)
    return {a: {**steered[a], "random_behaviour_rate": (random.get(a) or steered[a])["behaviour_rate"]} for a in tp.alphas}


def choose(points: dict[tuple[int, float], dict[str, float]], max_general_drop: float) -> tuple[int, float]:
    """The (layer, α) with the highest behaviour rate whose `general` is within `max_general_drop` of the best α = 0
    point's (of the best point's without an α = 0); the smallest α, then the lowest layer, on ties."""
    baseline = [p["general"] for (_, alpha), p in points.items() if alpha == 0] or [p["general"] for p in points.values()]
    floor = max(baseline) - max_general_drop - 1e-9
    best = max((p["behaviour_rate"], -abs(a), -layer) for (layer, a), p in points.items() if p["general"] >= floor)
    layer = -best[2]
    return layer, next(a for (la, a) in points if la == layer and -abs(a) == best[1])


def heatmap(points: dict[tuple[int, float], dict[str, float]], path: Path, title: str) -> Path:
    """Behaviour rate, `general` and the random control's behaviour over target layer × α, each cell labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({layer for layer, _ in points})
    alphas = sorted({a for _, a in points})
    panels = (("behaviour_rate", "behaviour rate"), ("general", "general (marks taken off)"),
              ("random_behaviour_rate", "random direction: behaviour"))
    fig, axes = plt.subplots(1, 3, figsize=(3 * (0.9 * len(alphas) + 1.5), 0.55 * len(layers) + 2.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        grid = [[points[(layer, a)][key] for a in alphas] for layer in layers]
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel("α")
        ax.set_ylabel("target layer")
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(ctx: RunContext) -> StageResult:
    import ray
    from safetensors.torch import load_file

    from graft.transplant import Transplant, TransplantError, fit_affine, model_fingerprint, random_direction, same_depth

    spec, tp = ctx.spec, ctx.spec.transplant
    data, concepts = ctx.board.get(Datasets), ctx.board.get(Concepts)
    concept = tp.concept or spec.skills[0].name
    req = SweepRequest(concepts.folder, concepts.target, data[concept].test, data[tp.general].test, tp, spec.evaluate,
                       spec.trust_remote_code, placement(spec))
    stored = load_file(str(Path(concepts.folder.path) / "concepts.safetensors"))
    vectors, hs, ht = stored["source_vectors"], stored["source_states"], stored["target_states"]
    n_source, n_target = vectors.shape[0], ht.shape[0]
    layers = tp.target_layers if tp.target_layers is not None else list(range(n_target))
    for layer in layers:
        if not 0 <= layer < n_target:
            raise TransplantError(f"transplant.target_layers: layer {layer} is out of range: the target has decoder layers "
                                  f"0..{n_target - 1}")
    if tp.source_layer is not None and tp.source_layer >= n_source:
        raise TransplantError(f"transplant.source_layer: layer {tp.source_layer} is out of range: the source has decoder layers "
                              f"0..{n_source - 1}")
    maps, directions = {}, {}
    for layer in layers:
        src = tp.source_layer if tp.source_layer is not None else same_depth(layer, n_target, n_source)
        maps[layer] = (src, fit_affine(hs[src], ht[layer]))
        directions[layer] = maps[layer][1].direction(vectors[src])
    result = StageResult(NAME)
    base_key = content_key(req)
    items = [Item(point_name(layer, a), content_key(base_key, layer, a),
                  {"target_layer": layer, "source_layer": maps[layer][0], "alpha": a,
                   "affine_r2_heldout": round(maps[layer][1].r2_heldout, 4)}) for layer in layers for a in tp.alphas]

    def build(todo) -> dict[str, dict[str, float]]:
        remote = ray.remote(**req.placement.ray_options())(score_layer)
        wanted = sorted({layer for layer in layers for a in tp.alphas if point_name(layer, a) in todo})
        refs = {layer: remote.remote(req, layer, directions[layer], random_direction(directions[layer], tp.seed + layer))
                for layer in wanted}
        metrics = {}
        for layer, by_alpha in as_completed(refs, NAME, ctx.log, unit="layers"):
            for a, scores in by_alpha.items():
                name = point_name(layer, a)
                if name in todo:
                    point = {**scores, "affine_r2_heldout": maps[layer][1].r2_heldout, "source_layer": maps[layer][0]}
                    (todo[name][0] / "point.json").write_text(json.dumps(point, indent=1))
                    metrics[name] = {k: float(v) for k, v in point.items()}
        return metrics

    paths = ctx.run_items(NAME, items, build, result)
    points = {(layer, a): json.loads((paths[point_name(layer, a)] / "point.json").read_text()) for layer in layers for a in tp.alphas}
    layer, alpha = choose(points, tp.max_general_drop)
    src_layer, amap = maps[layer]
    info = {"source_layer": src_layer, "affine_r2_heldout": amap.r2_heldout, "vector": tp.vector, "behaviour": tp.behaviour,
            **{k: points[(layer, alpha)][k] for k in ("behaviour_rate", "general", "random_behaviour_rate")}}

    def build_transplant(tmp: Path, run) -> dict[str, float]:
        Transplant(directions[layer], layer, alpha, model_fingerprint(concepts.target.model.path),
                   model_fingerprint(concepts.source.model.path), info).write_into(tmp)
        return {"layer": float(layer), "alpha": float(alpha), **{k: float(v) for k, v in info.items() if isinstance(v, float)}}

    chosen_key = content_key(base_key, "chosen", layer, alpha)
    chosen = ctx.run_item(NAME, "transplant", chosen_key, {"layer": layer, "alpha": alpha}, build_transplant, result)
    table = {point_name(la, a): {k: round(float(p[k]), 4) for k in ("behaviour_rate", "general", "random_behaviour_rate",
                                                                      "affine_r2_heldout")} for (la, a), p in points.items()}

    def build_report(tmp: Path, run) -> dict[str, float]:
        (tmp / "eval.json").write_text(json.dumps({"chosen": point_name(layer, alpha), "points": table}, indent=1))
        cols = ["behaviour_rate", "general", "random_behaviour_rate", "affine_r2_heldout"]
        (tmp / "eval.txt").write_text(format_table(["point", *cols], [[n, *(f"{row[c]:.3f}" for c in cols)] for n, row in table.items()])
                                      + f"\nchosen: {point_name(layer, alpha)}\n")
        heatmap(points, tmp / "heatmap.png", f"{spec.name}: behaviour rate, α · v injected at one target layer")
        return {}

    report = ctx.run_item(NAME, "report", content_key(base_key, "report", REPORT_VERSION), {"points": len(points)}, build_report, result)
    for name in ("eval.json", "eval.txt", "heatmap.png"):
        ctx.parent.artifact(report / name, "report")
    result.artifacts += [Transplanted(Ref(str(chosen), chosen_key), concepts.target),
                         Report(Ref(str(report), content_key(base_key, "report", REPORT_VERSION)), table)]
    result.metrics = {f"chosen.{k}": v for k, v in info.items() if isinstance(v, float)} | {"chosen.layer": layer,
                                                                                             "chosen.alpha": alpha}
    return result
