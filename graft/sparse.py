"""Sparse adapters (methods.md §3): a weight delta pruned at initialization by a score, trained under the fixed mask.

Built on PEFT's SHiRA tuner (`ShiraConfig` with a custom `mask_fn`): each targeted linear layer gets a
trainable vector of values at fixed (row, column) positions of its weight, so the delta is sparse and
of full rank. SHiRA sizes every module by one `r`: a module of shape (m, n) trains r·(m + n) entries,
the count of a rank-r LoRA on it. A keep-fraction therefore becomes the `r` whose total count over the
target modules is the nearest to that fraction of their weights (`shira_rank`); each module's own
fraction is then close to it, not equal (wider modules keep a smaller share).

Which entries are kept is decided before training, by a score per weight entry (`MASK_RULES`):
- `random`: uniform, seeded;
- `magnitude`: |θ|, the base's largest weights;
- `snip`: |g ⊙ θ| summed over a few batches of the skill's data (g: the loss gradient on the base).
GraSP needs a Hessian-gradient product and SynFlow an all-ones input, which a token-id model does not
take; neither is here.

An adapter on disk is a PEFT folder (`adapter_config.json` with `peft_type: SHIRA`,
`adapter_model.safetensors` with `<module>.shira_weight` and `<module>.shira_indices`). Its delta is read
as a `SparseDelta` per base tensor (`read_sparse_deltas`), which SkillPacks store as indices and values.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from graft.checkpoint import CheckpointReader, weight_files
from graft.loading import CPU_FP32, LoadOptions
from graft.registry import Registry

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


class SparseError(ValueError):
    """A sparse adapter that cannot be made or read; the message names the setting, module or file."""


@dataclass(frozen=True)
class SparseDelta:
    """A sparse weight delta: `values` at flat positions `index` (sorted, distinct) of a tensor of `shape`."""

    index: torch.Tensor  # int64, (k,)
    values: torch.Tensor  # float32, (k,)
    shape: tuple[int, ...]

    def dense(self) -> torch.Tensor:
        out = torch.zeros(int(torch.tensor(self.shape).prod()), dtype=torch.float32)
        out[self.index] = self.values.float()
        return out.view(self.shape)

    @property
    def kept(self) -> int:
        return int(self.index.numel())


# A mask rule scores every entry of each target weight: (model, {module name: linear}, batches, seed) -> {name: score}.
MaskRule = Callable[[nn.Module, dict[str, nn.Linear], list[dict[str, torch.Tensor]], int], dict[str, torch.Tensor]]
MASK_RULES: Registry[MaskRule] = Registry("mask rule")  # type: ignore[type-var]
NEEDS_BATCHES = frozenset({"snip"})


@MASK_RULES.register("random")
def random_scores(model: nn.Module, modules: dict[str, nn.Linear], batches: list, seed: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in modules.items():
        g = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
        out[name] = torch.rand(m.weight.shape, generator=g)
    return out


@MASK_RULES.register("magnitude")
def magnitude_scores(model: nn.Module, modules: dict[str, nn.Linear], batches: list, seed: int) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().abs().float() for name, m in modules.items()}


@MASK_RULES.register("snip")
def snip_scores(model: nn.Module, modules: dict[str, nn.Linear], batches: list, seed: int) -> dict[str, torch.Tensor]:
    """|g ⊙ θ| summed over `batches` (collated rows with labels), g the gradient of the base's loss."""
    if not batches:
        raise SparseError("rule 'snip' needs batches of the skill's data")
    params = list(model.parameters())
    was = [p.requires_grad for p in params]
    targets = {id(m.weight) for m in modules.values()}
    for p in params:  # gradients for the target weights only, none left behind
        p.requires_grad_(id(p) in targets)
        p.grad = None
    try:
        for batch in batches:
            model(**batch).loss.backward()
        return {name: (m.weight.grad * m.weight.detach()).abs().float() for name, m in modules.items()}
    finally:
        for p, flag in zip(params, was):
            p.grad = None
            p.requires_grad_(flag)


def target_linears(model: nn.Module, target_modules: Iterable[str]) -> dict[str, nn.Linear]:
    """The model's linear layers whose name ends with one of `target_modules` (PEFT's suffix matching), by name.

    SparseError when a target matches no module, or matches one that is not an `nn.Linear` (SHiRA adapts only those).
    """
    targets = list(target_modules)
    found: dict[str, nn.Linear] = {}
    for target in targets:
        hits = {n: m for n, m in model.named_modules() if n == target or n.endswith("." + target)}
        if not hits:
            raise SparseError(f"target_modules: {target!r} matches no module of the model")
        for n, m in hits.items():
            if not isinstance(m, nn.Linear):
                raise SparseError(f"target_modules: module {n!r} is a {type(m).__name__}; sparse adapters (SHiRA) take only nn.Linear")
            found[n] = m
    return dict(sorted(found.items()))


def shira_rank(shapes: Iterable[tuple[int, int]], keep_fraction: float, lora_rank: int | None = None) -> int:
    """SHiRA's `r` whose total count Σ r·(m + n) over `shapes` is the nearest to `keep_fraction` of Σ m·n (at least 1);
    with `lora_rank`, that rank (the count of a LoRA of that rank on the same modules) instead.

    SparseError when the fraction is not in (0, 1], or when that r asks some module for more entries than it has.
    """
    if not 0 < keep_fraction <= 1:
        raise SparseError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    shapes = list(shapes)
    if not shapes:
        raise SparseError("no target module to keep entries of")
    r = lora_rank or max(1, round(keep_fraction * sum(m * n for m, n in shapes) / sum(m + n for m, n in shapes)))
    asked = f"match_lora_rank {lora_rank}" if lora_rank else f"keep_fraction {keep_fraction} needs r={r}, which"
    for m, n in shapes:
        if r * (m + n) > m * n:
            raise SparseError(f"{asked} asks a ({m}, {n}) module for {r * (m + n)} of its {m * n} weights; ask for fewer")
    return r


def top_masks(scores: dict[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """Per module, a 0/1 mask of exactly r·(m + n) entries: the highest-scoring ones.

    SparseError naming the module when its scores are all zero (the mask would be arbitrary, e.g. SNIP on a
    module the skill's loss does not reach) or not finite.
    """
    out = {}
    for name, s in scores.items():
        if not torch.isfinite(s).all():
            raise SparseError(f"module {name!r}: mask scores hold NaN or Inf")
        if not bool((s > 0).any()):
            raise SparseError(f"module {name!r}: every mask score is zero, so the mask would select nothing by its rule")
        m, n = s.shape
        k = r * (m + n)
        mask = torch.zeros(s.numel())
        mask[s.reshape(-1).topk(k).indices] = 1
        out[name] = mask.view(m, n)
    return out


def masks_for(model: nn.Module, target_modules: Iterable[str], rule: str, keep_fraction: float,
              batches: list[dict[str, torch.Tensor]], seed: int, lora_rank: int | None = None) -> tuple[int, dict[str, torch.Tensor]]:
    """(SHiRA r, {module name: mask}) for the model's target linears, scored by `rule` (a `MASK_RULES` name),
    sized by `keep_fraction` or, when given, to a rank-`lora_rank` LoRA's count (`shira_rank`)."""
    modules = target_linears(model, target_modules)
    r = shira_rank([tuple(m.weight.shape) for m in modules.values()], keep_fraction, lora_rank)
    return r, top_masks(MASK_RULES.get(rule)(model, modules, batches, seed), r)


def shira_model(model: nn.Module, masks: dict[str, torch.Tensor], r: int):
    """`model` wrapped as a PEFT SHiRA model whose module masks are `masks` (keyed by module name in `model`)."""
    from peft import ShiraConfig, get_peft_model

    by_layer = {id(m): masks[n] for n, m in model.named_modules() if n in masks}

    def mask_fn(base_layer: nn.Module, r: int, **kwargs) -> torch.Tensor:
        return by_layer[id(base_layer)].to(device=base_layer.weight.device, dtype=base_layer.weight.dtype)

    config = ShiraConfig(r=r, mask_type="random", target_modules=sorted({n.rsplit(".", 1)[-1] for n in masks}), task_type="CAUSAL_LM")
    config.mask_fn = mask_fn  # PEFT's documented way to give SHiRA a custom mask
    peft_model = get_peft_model(model, config)
    adapted = {n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if hasattr(m, "shira_weight")}
    if adapted != set(masks):
        raise SparseError(f"SHiRA adapted {sorted(adapted ^ set(masks))[0]!r} other than the masks say")
    return peft_model


def _adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SparseError(f"{path}: not a readable JSON adapter config ({e})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "SHIRA":
        raise SparseError(f"{path}: peft_type: a sparse adapter is a PEFT SHIRA adapter, this is {config.get('peft_type')!r}"
                          if isinstance(config, dict) else f"{path}: not a JSON object")
    return config


def read_sparse_deltas(folder: str | Path, base: str | Path | None = None) -> dict[str, SparseDelta]:
    """{base tensor name: SparseDelta} of a SHiRA adapter folder (safetensors only), checked entry by entry.

    With `base`, each delta is also checked against the base's tensor of that name (it exists, same shape).
    SparseError naming the file and tensor for a missing pair, mismatched lengths, an index outside the
    tensor, a repeated index, a module with no entries, or non-finite values.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SparseError(f"{folder}: not an adapter folder")
    _adapter_config(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        weight_files(folder)  # names a pickle it refuses, if that is what the folder holds
        raise SparseError(f"{folder}: no {ADAPTER_WEIGHTS}")
    reader = CheckpointReader(folder)
    base_reader = CheckpointReader(base) if base is not None else None
    modules = sorted({k.rsplit(".", 1)[0] for k in reader.keys()})
    out: dict[str, SparseDelta] = {}
    where = folder / ADAPTER_WEIGHTS
    for module in modules:
        names = {part: f"{module}.{part}" for part in ("shira_weight", "shira_indices")}
        for name in names.values():
            if name not in reader:
                raise SparseError(f"{where}: tensor {name!r} is missing (a SHiRA module has both weight and indices)")
        extra = [k for k in reader.keys() if k.startswith(module + ".") and k not in names.values()]
        if extra:
            raise SparseError(f"{where}: tensor {extra[0]!r} is not a SHiRA tensor")
        values, idx = reader.get(names["shira_weight"]).float(), reader.get(names["shira_indices"])
        key = module.removeprefix(PREFIX) + ".weight"
        if idx.dim() != 2 or idx.shape[0] != 2 or values.dim() != 1 or idx.shape[1] != values.numel():
            raise SparseError(f"{where}: {names['shira_indices']!r} has shape {tuple(idx.shape)}, expected (2, {values.numel()})")
        if values.numel() == 0:
            raise SparseError(f"{where}: module {module!r} keeps no entry (its mask selects nothing)")
        if not torch.isfinite(values).all():
            raise SparseError(f"{where}: {names['shira_weight']!r} holds NaN or Inf")
        if base_reader is None:
            shape = (int(idx[0].max()) + 1, int(idx[1].max()) + 1)
        elif key not in base_reader:
            raise SparseError(f"{where}: module {module!r} has no tensor {key!r} in the base {base}")
        else:
            shape = tuple(base_reader.shape(key))
        rows, cols = idx.long()[0], idx.long()[1]
        if int(rows.min()) < 0 or int(cols.min()) < 0 or int(rows.max()) >= shape[0] or int(cols.max()) >= shape[1]:
            raise SparseError(f"{where}: {names['shira_indices']!r} holds an index outside the tensor's shape {list(shape)}")
        flat = rows * shape[1] + cols
        order = flat.argsort()
        flat, values = flat[order], values[order]
        if bool((flat[1:] == flat[:-1]).any()):
            raise SparseError(f"{where}: {names['shira_indices']!r} holds a repeated index")
        out[key] = SparseDelta(flat, values, shape)
    if not out:
        raise SparseError(f"{where}: holds no SHiRA module")
    return out


def load_sparse(base: str | Path, folder: str | Path, options: LoadOptions = CPU_FP32) -> nn.Module:
    """The base causal LM (safetensors only, opened as `options` say) with a sparse adapter's deltas added to its weights."""
    from graft.port import ported_model  # base + deltas in memory; graft.port reads SparseDelta, so imported here

    deltas = read_sparse_deltas(folder, base)
    weight_files(base)
    return ported_model(base, deltas, options=options)
