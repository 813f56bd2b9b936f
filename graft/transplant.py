"""Concept transplantation (ConTrans, methods.md §5): a behaviour moved from a small aligned model into a larger
one through its residual stream, with no training of the larger model.

1. Concept vector in the source: the last-token residual-stream output of every decoder layer on paired
   positive/negative texts; the vector is the mean of the pair differences, or their first principal
   component (`VECTORS`, by name). `last_token_states` takes the states; `concept_vectors` the vectors.
2. Affine map from a source layer to a target layer, fitted by closed-form least squares
   (`torch.linalg.lstsq`) on both models' last-token states over the same ordinary prompts: the first 80%
   fit it, the rest give the held-out R² (`fit_affine`); the shared texts may include both sides of the concept pairs
   (`with_pairs`), so that the map has seen the concept's direction. A direction maps by the linear part only:
   v_target = W v_source (the bias moves points, not differences).
3. Injection of α · v_target into one target decoder layer's output, at every position, by a forward hook
   (`Transplant.applied(model)`, a context manager). A `Transplant` saves to a folder (`vector.safetensors`
   and `transplant.json`: the layer, α, both models' fingerprints and a content hash) and loads only onto
   the model it was made for: another architecture, width, depth or weights is refused by name.

Errors are `TransplantError`, one line naming the layer, width, file or prompt set.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from graft.artifacts import ArtifactError, manifest_hash
from graft.atomic import atomic_dir
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint, compare
from graft.registry import Registry
from graft.testbed.skills import shows_behaviour

FORMAT, FORMAT_VERSION = "graftline-transplant", 1
MANIFEST, VECTOR = "transplant.json", "vector.safetensors"
HELD_OUT = 0.2


class TransplantError(ArtifactError):
    """A concept transplant that cannot be made, read or applied; the message names the layer, width or file."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM, in order (Llama/Qwen2/Mistral `model.layers`, GPT-2 `transformer.h`)."""
    inner = getattr(model, "base_model", model)
    for path in (("layers",), ("model", "layers"), ("h",), ("transformer", "h")):
        found = inner
        for part in path:
            found = getattr(found, part, None)
        if isinstance(found, nn.ModuleList) and len(found):
            return found
    raise TransplantError(f"{type(model).__name__}: no decoder layer list found (model.layers or transformer.h)")


def check_layer(model: nn.Module, layer: int, what: str = "layer") -> int:
    """`layer` if the model has it (TransplantError naming the range otherwise)."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise TransplantError(f"{what} {layer} is out of range: the model has decoder layers 0..{n - 1}")
    return layer


def config_depth(folder: str | Path) -> int | None:
    """Decoder layers of a checkpoint folder, read from its config.json (`num_hidden_layers` or GPT-2's `n_layer`)
    without loading a weight; None when there is no readable count."""
    try:
        data = json.loads((Path(folder).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    depth = data.get("num_hidden_layers", data.get("n_layer")) if isinstance(data, dict) else None
    return depth if isinstance(depth, int) else None


def same_depth(layer: int, n_from: int, n_to: int) -> int:
    """The layer of an `n_to`-layer model at the relative depth of `layer` in an `n_from`-layer one."""
    return round(layer * (n_to - 1) / max(1, n_from - 1))


def _output(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def last_token_states(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """(layers, len(texts), width): each decoder layer's output at each text's last token, fp32 on the CPU."""
    if not texts:
        raise TransplantError("no texts to take states of")
    layers = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(lambda mod, inp, out, i=i: captured.__setitem__(i, _output(out)))
             for i, layer in enumerate(layers)]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every text's last token is then the last position
    device = next(model.parameters()).device
    chunks = []
    try:
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True).to(device)
            model(**enc)
            chunks.append(torch.stack([captured[i][:, -1, :].float().cpu() for i in range(len(layers))]))
    finally:
        tokenizer.padding_side = side
        for h in hooks:
            h.remove()
    return torch.cat(chunks, dim=1)


def _mean(diffs: torch.Tensor) -> torch.Tensor:
    return diffs.mean(dim=0)


def _pca(diffs: torch.Tensor) -> torch.Tensor:
    """The first principal component of the differences, scaled to their mean's projection and pointing its way."""
    mean = diffs.mean(dim=0)
    _, _, vh = torch.linalg.svd(diffs - mean, full_matrices=False)
    pc = vh[0]
    proj = float(mean @ pc)
    return pc * (proj if proj != 0 else mean.norm())


@dataclass(frozen=True)
class Behaviour:
    """What shows a concept in a completion, and the completion with the concept's marks taken off (to score content)."""

    shows: Callable[[str], bool]
    strip: Callable[[str], str]


BEHAVIOURS: Registry[Behaviour] = Registry("behaviour")  # type: ignore[type-var]
BEHAVIOURS.register("uppercase")(Behaviour(shows_behaviour, str.lower))  # the testbed's concept; its answers are lower case


VECTORS: Registry[Callable[[torch.Tensor], torch.Tensor]] = Registry("concept vector")  # type: ignore[type-var]
VECTORS.register("mean")(_mean)
VECTORS.register("pca")(_pca)


def concept_vectors(positive: torch.Tensor, negative: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(layers, width) concept vectors from paired states (layers, pairs, width), by a `VECTORS` rule."""
    if positive.shape != negative.shape:
        raise TransplantError(f"positive states {tuple(positive.shape)} and negative {tuple(negative.shape)} are not paired")
    if positive.shape[1] < 2:
        raise TransplantError(f"a concept needs at least 2 positive/negative pairs, got {positive.shape[1]}")
    rule = VECTORS.get(how)
    return torch.stack([rule(positive[layer] - negative[layer]) for layer in range(positive.shape[0])])


@dataclass(frozen=True)
class AffineMap:
    """y ≈ x W + b from a source layer's states (width `W.shape[0]`) to a target layer's (`W.shape[1]`)."""

    weight: torch.Tensor
    bias: torch.Tensor
    r2_heldout: float
    fitted_on: int

    def direction(self, v: torch.Tensor) -> torch.Tensor:
        """A source-space direction in target space: v W (differences carry no bias)."""
        if v.shape != (self.weight.shape[0],):
            raise TransplantError(f"a vector of width {tuple(v.shape)} does not fit a map from width {self.weight.shape[0]}")
        return v.float() @ self.weight


def r2(pred: torch.Tensor, truth: torch.Tensor) -> float:
    """Coefficient of determination over all output dimensions: 1 − SS_res / SS_tot."""
    ss_tot = float(((truth - truth.mean(dim=0)) ** 2).sum())
    return 1.0 - float(((pred - truth) ** 2).sum()) / max(ss_tot, 1e-12)


def fit_affine(source: torch.Tensor, target: torch.Tensor, held_out: float = HELD_OUT) -> AffineMap:
    """Least squares (torch.linalg.lstsq) of target states on source states (rows: the same prompts, in order):
    the first 1 − `held_out` of the rows fit it, the rest give its R²."""
    if source.shape[0] != target.shape[0]:
        raise TransplantError(f"{source.shape[0]} source states and {target.shape[0]} target states: not the same prompts")
    n = source.shape[0]
    fit = int(round(n * (1 - held_out)))
    if fit < 2 or n - fit < 1:
        raise TransplantError(f"{n} shared prompts are too few to fit a map and hold {held_out:.0%} out")
    x = torch.cat([source.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(x[:fit], target.double()[:fit], driver="gelsd").solution
    score = r2((x[fit:] @ solution).float(), target[fit:].float())
    return AffineMap(solution[:-1].float(), solution[-1].float(), score, fit)


def with_pairs(shared: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """(layers, shared + 2 · pairs, width): one model's states on the shared prompts and on both sides of the concept
    pairs, in a fixed shuffled order (the same for both models), so that `fit_affine`'s held-out rows hold both kinds.

    Ordinary prompts alone never show the concept, so a map fitted on them alone learns nothing of its direction."""
    rows = torch.cat([shared, positive, negative], dim=1)
    return rows[:, torch.randperm(rows.shape[1], generator=torch.Generator().manual_seed(0))]


def model_fingerprint(folder: str | Path) -> dict:
    """What a transplant checks of a model: architecture, tensor shapes and every tensor's SHA-256."""
    reader = CheckpointReader(folder)
    return base_fingerprint(reader, list(reader.keys()))


@dataclass
class Transplant:
    """α · vector added to the output of decoder layer `layer` of the model fingerprinted `target`."""

    vector: torch.Tensor
    layer: int
    alpha: float
    target: dict
    source: dict
    info: dict

    def check_model(self, model: nn.Module, folder: str | Path) -> None:
        """TransplantError unless `model` (loaded from `folder`) is the model this transplant was made for."""
        problems, drifted = compare(self.target, CheckpointReader(folder))
        if problems or drifted:
            why = problems[0] if problems else f"tensor {drifted[0]!r} differs from the model it was made for"
            raise TransplantError(f"{folder}: not the model this transplant was made for ({why})")
        check_layer(model, self.layer)
        width = _width(model)
        if self.vector.shape != (width,):
            raise TransplantError(f"vector of width {self.vector.numel()} does not fit the model's hidden size {width}")

    @contextlib.contextmanager
    def applied(self, model: nn.Module, folder: str | Path, alpha: float | None = None) -> Iterator[nn.Module]:
        """`model` (loaded from `folder`, checked to be the one this was made for) with α · vector added to layer
        `layer`'s output at every position, for the `with` block; `alpha` overrides the saved α."""
        self.check_model(model, folder)
        with inject(model, self.layer, self.vector, self.alpha if alpha is None else alpha) as steered:
            yield steered

    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write the transplant to `folder` atomically (`graft.atomic.atomic_dir`)."""
        with atomic_dir(folder, overwrite=overwrite, kind="transplant") as tmp:
            self.write_into(tmp)
        return Path(folder)

    def write_into(self, folder: Path) -> None:
        """Write vector.safetensors and transplant.json into an existing folder (the caller owns atomicity)."""
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "layer": self.layer, "alpha": self.alpha,
                    "width": int(self.vector.numel()), "target": self.target, "source": self.source, "info": self.info,
                    "vector_sha256": _vector_digest(self.vector)}
        save_file({"vector": self.vector.float().contiguous()}, str(folder / VECTOR), metadata={"format": FORMAT})
        manifest["content_hash"] = manifest_hash(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))

    @classmethod
    def load(cls, folder: str | Path) -> "Transplant":
        folder = Path(folder)
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise TransplantError(f"{path}: not a readable transplant manifest ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise TransplantError(f"{path}: format: not a graftline transplant")
        if manifest.get("format_version") != FORMAT_VERSION:
            raise TransplantError(f"{path}: format_version: {manifest.get('format_version')!r}, this graftline reads {FORMAT_VERSION}")
        if manifest.get("content_hash") != manifest_hash(manifest):
            raise TransplantError(f"{path}: content_hash: does not match the manifest (the manifest was modified)")
        try:
            vector = load_file(str(folder / VECTOR))["vector"]
        except Exception as e:  # noqa: BLE001 - any unreadable payload is refused the same way
            raise TransplantError(f"{folder / VECTOR}: not a readable vector ({str(e).splitlines()[0]})") from None
        if _vector_digest(vector) != manifest.get("vector_sha256") or vector.shape != (manifest.get("width"),):
            raise TransplantError(f"{folder / VECTOR}: does not match vector_sha256/width in {MANIFEST}")
        return cls(vector, int(manifest["layer"]), float(manifest["alpha"]), manifest["target"], manifest["source"],
                   manifest.get("info", {}))


def _vector_digest(v: torch.Tensor) -> str:
    from graft.fingerprint import tensor_digest

    return tensor_digest(v.float().contiguous())


def _width(model: nn.Module) -> int:
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.n_embd)


@contextlib.contextmanager
def inject(model: nn.Module, layer: int, vector: torch.Tensor, alpha: float) -> Iterator[nn.Module]:
    """`model` with α · `vector` added to decoder layer `layer`'s output at every position, inside the `with` block."""
    check_layer(model, layer)
    width = _width(model)
    if vector.shape != (width,):
        raise TransplantError(f"vector of width {vector.numel()} does not fit the model's hidden size {width}")
    block = decoder_layers(model)[layer]
    param = next(model.parameters())
    shift = (alpha * vector.float()).to(device=param.device, dtype=param.dtype)

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (output[0] + shift, *output[1:])
        return output + shift

    handle = block.register_forward_hook(hook)
    try:
        yield model
    finally:
        handle.remove()


def pair_texts(rows: Sequence[dict], where: str = "pairs") -> tuple[list[str], list[str]]:
    """(positive texts, negative texts) of concept pairs: rows with `positive`/`negative` texts, or testbed concept rows
    with `prompt`/`answer`/`negative` (positive = prompt + answer, negative = prompt + negative).

    TransplantError naming the row and field for an empty set, or a row without both sides.
    """
    if not rows:
        raise TransplantError(f"{where}: no positive/negative pairs")
    pos, neg = [], []
    for i, row in enumerate(rows):
        if "positive" in row or "answer" not in row:
            p, n = row.get("positive"), row.get("negative")
        else:
            p, n = row.get("prompt", "") + row["answer"], (row.get("prompt", "") + row["negative"]) if "negative" in row else None
        for side, text in (("positive", p), ("negative", n)):
            if not isinstance(text, str) or not text:
                raise TransplantError(f"{where}: row {i}: no {side} text (each pair needs both sides)")
        pos.append(p)
        neg.append(n)
    return pos, neg


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A random direction with the norm of `like` (the control a concept vector is measured against)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(like.shape, generator=g)
    return r / r.norm() * like.norm()


def steering_rates(model: nn.Module, tokenizer, layer: int, vector: torch.Tensor, alphas: Sequence[float],
                   prompts: Sequence[str], general: Sequence[dict] | None, behaviour: str, max_new_tokens: int,
                   batch_size: int = 64) -> dict[float, dict[str, float]]:
    """Per α: the share of `prompts` whose greedy completion shows `behaviour` with α · `vector` injected at `layer`,
    and (unless `general` is None) exact match on `general` rows (prompt/answer) once the behaviour's marks are taken
    off the completion."""
    from graft.evaluation import generate_answers

    judge = BEHAVIOURS.get(behaviour)
    out = {}
    for alpha in alphas:
        with inject(model, layer, vector, alpha):
            shown = generate_answers(model, tokenizer, list(prompts), max_new_tokens, batch_size)
            out[alpha] = {"behaviour_rate": sum(map(judge.shows, shown)) / len(shown)}
            if general is not None:
                answered = generate_answers(model, tokenizer, [r["prompt"] for r in general], max_new_tokens, batch_size)
                out[alpha]["general"] = sum(judge.strip(a) == r["answer"] for a, r in zip(answered, general)) / len(general)
    return out
