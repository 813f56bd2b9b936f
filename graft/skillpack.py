"""SkillPacks (GraftLLM, methods.md §1): a skill's delta, compressed module by module, in one folder.

Module-aware compression of Δ = θ_after − θ_before:
- embeddings and LM head: magnitude pruning, the top-α fraction of entries kept (`magnitude_prune`);
- attention and MLP matrices: truncated SVD ΔW ≈ U Vᵀ (`svd_quant`), then U and V quantized column by
  column, with more bits for the leading rank band than for the tail (e.g. 8/4, or 3 throughout).
  The rank of each matrix comes from one of two rules:
  - energy: the smallest k holding a fraction β of that matrix's Σσ²;
  - budget: the whole pack gets at most a fraction of the bf16 delta's bytes, and ranks go to whichever
    matrix's next direction holds the most σ² per byte, across all matrices.
  Calibration (the second moment H = E[xxᵀ] of each layer's inputs on the skill's data,
  `graft.calibration.input_moments`) makes it calibration-aware: with the `gptq` quantizer V is rounded
  GPTQ-style against H, U is refit to the rounded V (least squares in the output on such inputs) and
  then rounded GPTQ-style too; with `weighted_svd` the SVD is of Δ·diag(s), s = sqrt(diag H), so the
  kept directions are the ones that move the layer's output, not the largest in weight space. A matrix
  that cannot be calibrated (no moment for it, a Conv1D layer, a moment GPTQ cannot factorize) is
  rounded to nearest / factorized unweighted instead, and the manifest's `warnings` name it and say why.
- vectors (norms, biases): fp16 (`dense`);
- a sparse adapter's deltas (`graft.sparse.SparseDelta`) stay sparse: each kept entry's flat position,
  bit-packed at ceil(log2(numel)) bits, and its value in fp16 (`sparse`).
A folder holds `pack.safetensors` (the compressed tensors: bytes on disk are the compressed bytes)
and `skillpack.json` (format version, base fingerprint, per-tensor scheme and bytes, source info,
checksums of every other file, and a hash of the manifest itself). Loading parses the manifest by its
schema (`graft.manifests`), checks each entry against its scheme's model and the stored tensors'
dtypes and shapes against what the entry implies, and verifies every checksum, so a tampered,
damaged or hand-made pack is refused with one line naming the file and field before any tensor is
decoded.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator
from safetensors.torch import load_file, save_file

from graft.artifacts import ArtifactError, manifest_hash, parse_json, payload_checksums, safe_name, validate, verify_payload
from graft.atomic import MARKER, atomic_dir
from graft.calibration import rms_scales
from graft.fingerprint import tensor_digest
from graft.lora import LowRankDelta
from graft.manifests import SKILLPACK_FORMAT, SKILLPACK_VERSION, SkillPackManifest
from graft.quantize import (QUANTIZERS, VALID_BITS, Quantizer, UnusableHessian, encode_codes, from_grid, pack_uints, rtn,
                            unpack_bits, unpack_uints)
from graft.registry import Registry
from graft.safetensors_io import NAMES, SafetensorsError, read_header
from graft.signing import SIGNATURE, sign_folder
from graft.sparse import SparseDelta

FORMAT, FORMAT_VERSION = SKILLPACK_FORMAT, SKILLPACK_VERSION
MANIFEST, PAYLOAD = "skillpack.json", "pack.safetensors"
NOT_PAYLOAD = frozenset({MANIFEST, MARKER, SIGNATURE})  # files of a pack folder its checksums do not cover
EMBEDDING_MARKERS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out")
GRID_BYTES = 4  # fp16 min + fp16 step per quantized column

Delta = torch.Tensor | LowRankDelta | SparseDelta


class SkillPackError(ArtifactError):
    """A SkillPack that cannot be made, read or applied; the message names the pack and tensor."""


@dataclass(frozen=True)
class PackSettings:
    energy: float = 0.95
    bits: tuple[int, ...] = (8, 4)
    band_fractions: tuple[float, ...] = (0.5, 0.5)
    keep_fraction: float = 0.1  # α for embeddings / head
    budget: float | None = None  # at most this fraction of the bf16 delta's bytes; ranks allocated across matrices instead of by β
    quantizer: str = "rtn"  # a graft.quantize.QUANTIZERS name; "gptq" needs calibration
    weighted_svd: bool = False  # SVD of Δ·diag(input RMS); needs calibration
    allocation: str = "energy"  # a RANK_VALUES name: what a direction is worth when `budget` shares bytes out

    @property
    def needs_calibration(self) -> bool:
        """Whether packing reads the layers' input moments (a calibrated quantizer or the weighted SVD)."""
        return self.weighted_svd or QUANTIZERS.get(self.quantizer).calibrated


Layout = dict[str, tuple[str, tuple[int, ...]]]  # stored tensor (local name) → (safetensors dtype, shape)


@dataclass(frozen=True)
class Scheme:
    """One compression scheme: how a delta is encoded and decoded, and what its manifest entry holds.

    `entry` is the pydantic model of the scheme's manifest entry; `layout(entry)` the stored tensors
    that entry implies, so a pack is checked against its manifest before anything is decoded.
    """

    # encode(delta, settings, moment): moment is the layer's input second moment (in × in), or None
    encode: Callable[[Delta, PackSettings, torch.Tensor | None], tuple[dict[str, torch.Tensor], dict]]
    decode: Callable[[dict[str, torch.Tensor], dict], torch.Tensor]
    entry: type[BaseModel]
    layout: Callable[[BaseModel], Layout]


SCHEMES: Registry[Scheme] = Registry("compression scheme")


@dataclass(frozen=True)
class Factors:
    """delta ≈ U diag(S) Vᵀ with S descending; `weighted` when the SVD was of delta·diag(input RMS)."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    shape: tuple[int, int]
    weighted: bool


def factorize(delta: Delta, input_scale: torch.Tensor | None = None) -> Factors:
    """The SVD of a delta; for a LoRA delta through QR of the factors, never densifying B A.

    With `input_scale` (one value per input channel) the SVD is of delta·diag(scale), and V comes back
    divided by the scale, so U diag(S) Vᵀ is still the delta and S ranks directions by their effect on
    the layer's output.
    """
    if input_scale is not None:  # a calibration moment may live on the GPU the expert ran on; the delta's device decides
        input_scale = input_scale.to(delta.A.device if isinstance(delta, LowRankDelta) else getattr(delta, "device", "cpu"))
    if isinstance(delta, LowRankDelta):
        scale = None if delta.fan_in_fan_out else input_scale  # Conv1D: calibration not applied
        a = delta.A.float() * scale[None, :] if scale is not None else delta.A.float()
        qb, rb = torch.linalg.qr(delta.B.float())
        qa, ra = torch.linalg.qr(a.T)
        um, s, vmh = torch.linalg.svd(delta.scale * rb @ ra.T)
        u, v = qb @ um, qa @ vmh.T
        if delta.fan_in_fan_out:
            u, v = v, u
    else:
        scale = input_scale
        m = delta.float() * scale[None, :] if scale is not None else delta.float()
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        v = vh.T
    if scale is not None:
        v = v / scale[:, None]
    return Factors(u, s, v, tuple(delta.shape), scale is not None)


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest k whose leading singular values hold a fraction `energy` of Σσ²."""
    e = s.double().pow(2)
    if e.sum() == 0:
        return 0
    cum = torch.cumsum(e, 0) / e.sum()
    return int(torch.searchsorted(cum, torch.tensor(energy, dtype=cum.dtype) - 1e-12).item()) + 1


def _bands(k: int, fractions: tuple[float, ...]) -> list[int]:
    sizes = [math.ceil(k * f) for f in fractions]
    out, left = [], k
    for n in sizes:
        out.append(min(n, left))
        left -= out[-1]
    return out


def rank_bytes(shape: tuple[int, int], st: PackSettings) -> float:
    """Bytes one kept direction costs on average: its U and V columns at the bands' mean bits, plus their grids."""
    bits = sum(b * f for b, f in zip(st.bits, st.band_fractions))
    return (shape[0] + shape[1]) * bits / 8 + 2 * GRID_BYTES


# What a kept direction is worth, for allocating a byte budget across matrices: value(factors, importance)
# gives one non-negative number per direction (importance: the skill's per-entry score of that matrix, or None).
RankValue = Callable[[Factors, torch.Tensor | None], torch.Tensor]
RANK_VALUES: Registry[RankValue] = Registry("rank value")


@RANK_VALUES.register("energy")
def _energy_value(f: Factors, importance: torch.Tensor | None) -> torch.Tensor:
    """σ²: the direction's share of the delta's energy."""
    return f.s.double().pow(2)


@RANK_VALUES.register("importance")
def _importance_value(f: Factors, importance: torch.Tensor | None) -> torch.Tensor:
    """Σ F ⊙ (σ u vᵀ)²: the loss a diagonal-Fisher model predicts from dropping the direction."""
    if importance is None:
        raise SkillPackError("importance-aware rank allocation needs the skill's importance scores for every matrix")
    return f.s.double().pow(2) * torch.einsum("ir,ij,jr->r", f.u.double().pow(2), importance.double(), f.v.double().pow(2))


@RANK_VALUES.register("energy_importance")
def _energy_importance_value(f: Factors, importance: torch.Tensor | None) -> torch.Tensor:
    """The geometric mean of the two: importance ranks directions, energy damps the noise of a diagonal Fisher."""
    return (_energy_value(f, importance) * _importance_value(f, importance)).sqrt()


def allocate_ranks(values: dict[str, torch.Tensor], costs: dict[str, float], budget: float) -> dict[str, int]:
    """Ranks per matrix with Σ rank·cost ≤ budget, taken greedily by value per byte across all matrices.

    A matrix's directions are taken in order (rank k means its first k), so each one is valued at most
    as much as the one before it.
    """
    values = {k: torch.cummin(v.double(), 0).values if len(v) else v for k, v in values.items()}
    ranks = {k: 0 for k in values}
    heap = [(-float(v[0]) / costs[k], k) for k, v in values.items() if len(v) and v[0] > 0]
    heapq.heapify(heap)
    used = 0.0
    while heap:
        _, k = heapq.heappop(heap)
        if used + costs[k] > budget:
            continue
        ranks[k] += 1
        used += costs[k]
        v = values[k]
        if ranks[k] < len(v) and v[ranks[k]] > 0:
            heapq.heappush(heap, (-float(v[ranks[k]]) / costs[k], k))
    return ranks


REFIT_FP64_MAX = 1 << 22  # moments up to 2048 x 2048 are refit in float64; larger ones in fp32


def _refit_u(delta: Delta, v: torch.Tensor, moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U minimizing E‖(Δ − U Vᵀ) x‖² for inputs of second moment H, and Vᵀ H V (U's input moment), on H's device.

    The products with H and Δ run in float64 while H is small (`REFIT_FP64_MAX` entries: cheap, and
    what every committed result was packed with) and in fp32 beyond it, where float64 would double the
    memory of a 14336-wide moment and run at a fraction of fp32 speed on most GPUs. Only the small
    r x r solve always takes float64.
    """
    device, v = moment.device, v.to(moment.device)
    wide = torch.float64 if moment.numel() <= REFIT_FP64_MAX else torch.float32
    hv = moment.to(wide) @ v.to(wide)
    if isinstance(delta, LowRankDelta):
        dhv = delta.scale * (delta.B.to(device, wide) @ (delta.A.to(device, wide) @ hv))
    else:
        dhv = delta.to(device, wide) @ hv
    hz = (v.to(wide).T @ hv).double()
    return (dhv.double() @ torch.linalg.pinv(hz, hermitian=True)).float(), hz


Rounded = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a quantizer's codes, per-column min and step


def _uncalibrated(delta: Delta, has_moment: bool) -> str | None:
    """Why a matrix gets no calibration although the pack asks for it; None when it does get it."""
    if isinstance(delta, LowRankDelta) and delta.fan_in_fan_out:
        return "a Conv1D (fan_in_fan_out) layer, which calibration does not cover"
    return None if has_moment else "no calibration moment"


def _round_factors(delta: Delta, u: torch.Tensor, v: torch.Tensor, bits: list[int], quantizer: Quantizer,
                   moment: torch.Tensor | None) -> tuple[Rounded, Rounded, str | None]:
    """V and U rounded (V first: a calibrated quantizer refits U to the rounded V), and why a calibrated
    quantizer fell back to round-to-nearest for both (None when it did not).

    A calibrated quantizer runs on the moment's device (where calibration left it); the codes and grids
    come back to the factors' device.
    """
    if not quantizer.calibrated:
        return quantizer.quantize(v, bits, None, "rows"), quantizer.quantize(u, bits, None, "cols"), None
    fallback = _uncalibrated(delta, moment is not None)
    if fallback is None:
        try:
            v_rounded = quantizer.quantize(v.to(moment.device), bits, moment, "rows")
            refit, hz = _refit_u(delta, from_grid(*v_rounded), moment)
            u_rounded = quantizer.quantize(refit, bits, hz, "cols")
            home = v.device
            return tuple(t.to(home) for t in v_rounded), tuple(t.to(home) for t in u_rounded), None
        except UnusableHessian as e:
            fallback = str(e)
    return rtn(v, bits), rtn(u, bits), fallback


def encode_factors(delta: Delta, f: Factors, k: int, st: PackSettings,
                   moment: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The svd_quant entry of rank k: U and V quantized by rank band (calibrated by `moment` if the quantizer is).

    When a calibrated quantizer cannot use the moment, both are rounded to nearest and the entry says so:
    `quantizer` is "rtn" and `fallback` says why (`pack_skill` turns it into a manifest warning).
    """
    energy = f.s.double().pow(2)
    kept = float(energy[:k].sum() / energy.sum()) if energy.sum() > 0 else 1.0
    meta = {"shape": list(f.shape), "rank": k, "bands": [], "energy_kept": kept, "weighted_svd": f.weighted, "quantizer": st.quantizer}
    if k == 0:
        return {}, meta
    bands = _bands(k, st.band_fractions)
    bits = [b for n, b in zip(bands, st.bits) for _ in range(n)]
    (v_codes, v_lo, v_step), (u_codes, u_lo, u_step), fallback = _round_factors(
        delta, f.u[:, :k] * f.s[:k], f.v[:, :k], bits, QUANTIZERS.get(st.quantizer), moment)
    tensors: dict[str, torch.Tensor] = {}
    start = 0
    for i, (n, b) in enumerate(zip(bands, st.bits)):
        if n == 0:
            continue
        cols = slice(start, start + n)
        for name, (codes, lo, step) in (("u", (u_codes, u_lo, u_step)), ("v", (v_codes, v_lo, v_step))):
            tensors.update({f"{name}{i}.{part}": t for part, t in encode_codes(codes[:, cols], lo[cols], step[cols], b).items()})
        meta["bands"].append({"band": i, "start": start, "cols": n, "bits": b})
        start += n
    if fallback is not None:
        meta.update(quantizer="rtn", fallback=fallback)
    return tensors, meta


def _weighting(st: PackSettings, moment: torch.Tensor | None) -> torch.Tensor | None:
    return rms_scales(moment) if st.weighted_svd and moment is not None else None


def _encode_svd_quant(delta: Delta, st: PackSettings, moment: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    f = factorize(delta, _weighting(st, moment))
    return encode_factors(delta, f, energy_rank(f.s, st.energy), st, moment)


@dataclass(frozen=True)
class Band:
    """One stored rank band of one factor of an svd_quant entry: its codes on an fp16 (min, step) grid."""

    factor: str  # "u" or "v"
    index: int  # the band's number; its tensors are f"{factor}{index}.codes/.min/.step"
    start: int  # first rank column of the band
    codes: torch.Tensor  # (rows of the factor, columns of the band), int64
    lo: torch.Tensor
    step: torch.Tensor

    @property
    def prefix(self) -> str:
        return f"{self.factor}{self.index}"


def svd_bands(t: dict[str, torch.Tensor], meta: dict) -> Iterator[Band]:
    """The bands of an svd_quant entry's stored tensors `t`, U's and V's of each rank band in turn."""
    rows, cols = meta["shape"]
    for b in meta["bands"]:
        for factor, dim in (("u", rows), ("v", cols)):
            prefix = f"{factor}{b['band']}"
            codes = unpack_bits(t[f"{prefix}.codes"], b["bits"], dim * b["cols"]).view(dim, b["cols"])
            yield Band(factor, b["band"], b["start"], codes, t[f"{prefix}.min"], t[f"{prefix}.step"])


def _svd_factors(t: dict[str, torch.Tensor], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) of an svd_quant entry, dequantized and joined across rank bands: ΔW = U Vᵀ."""
    rows, cols = meta["shape"]
    parts = {"u": [torch.zeros(rows, 0)], "v": [torch.zeros(cols, 0)]}
    for band in svd_bands(t, meta):
        parts[band.factor].append(from_grid(band.codes, band.lo, band.step))
    return torch.cat(parts["u"], dim=1), torch.cat(parts["v"], dim=1)


def _decode_svd_quant(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    u, v = _svd_factors(t, meta)
    return u @ v.T


def _dense(delta: Delta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, (LowRankDelta, SparseDelta)) else delta.float()


def _encode_magnitude_prune(delta: Delta, st: PackSettings,
                            moment: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    d = _dense(delta)
    n = max(1, int(round(st.keep_fraction * d.numel())))
    idx = d.abs().reshape(-1).topk(n).indices.sort().values
    return {"index": idx.to(torch.int32), "value": d.reshape(-1)[idx].half()}, {"shape": list(d.shape), "kept": n}


def _decode_magnitude_prune(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    out = torch.zeros(math.prod(meta["shape"]))
    out[t["index"].long()] = t["value"].float()
    return out.view(meta["shape"])


def _encode_dense(delta: Delta, st: PackSettings, moment: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    d = _dense(delta)
    return {"value": d.half()}, {"shape": list(d.shape)}


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    scheme: str
    shape: list[PositiveInt]
    stored: list[str]
    bytes: NonNegativeInt
    bf16_bytes: NonNegativeInt


class BandEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    band: NonNegativeInt
    start: NonNegativeInt
    cols: PositiveInt
    bits: int = Field(ge=min(VALID_BITS), le=max(VALID_BITS))


class SvdQuantEntry(_Entry):
    scheme: Literal["svd_quant"]
    shape: list[PositiveInt] = Field(min_length=2, max_length=2)
    rank: NonNegativeInt
    bands: list[BandEntry]
    energy_kept: float = Field(ge=0, le=1 + 1e-6)
    weighted_svd: bool
    quantizer: str
    fallback: str | None = None  # why the pack's calibrated quantizer rounded this matrix to nearest instead

    @model_validator(mode="after")
    def _bands_cover_rank(self) -> "SvdQuantEntry":
        QUANTIZERS.check(self.quantizer)
        start = 0
        for b in self.bands:
            if b.start != start:
                raise ValueError(f"bands: band {b.band} starts at column {b.start}, expected {start}")
            start += b.cols
        if start != self.rank or self.rank > min(self.shape):
            raise ValueError(f"rank {self.rank} does not match its bands ({start} columns) or shape {self.shape}")
        return self


def _svd_layout(e: SvdQuantEntry) -> Layout:
    out: Layout = {}
    for b in e.bands:
        for factor, dim in (("u", e.shape[0]), ("v", e.shape[1])):
            out[f"{factor}{b.band}.codes"] = ("U8", (-(-dim * b.cols * b.bits // 8),))
            out[f"{factor}{b.band}.min"] = ("F16", (b.cols,))
            out[f"{factor}{b.band}.step"] = ("F16", (b.cols,))
    return out


class MagnitudePruneEntry(_Entry):
    scheme: Literal["magnitude_prune"]
    kept: PositiveInt

    @model_validator(mode="after")
    def _fits(self) -> "MagnitudePruneEntry":
        if self.kept > math.prod(self.shape):
            raise ValueError(f"kept {self.kept} entries of a tensor of shape {self.shape}")
        return self


def _magnitude_layout(e: MagnitudePruneEntry) -> Layout:
    return {"index": ("I32", (e.kept,)), "value": ("F16", (e.kept,))}


def _decode_magnitude_checked(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    n = math.prod(meta["shape"])
    idx = t["index"]
    if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise SkillPackError(f"magnitude_prune entry of shape {meta['shape']} has an index outside the tensor")
    return _decode_magnitude_prune(t, meta)


class DenseEntry(_Entry):
    scheme: Literal["dense"]


def index_bits(numel: int) -> int:
    """Bits one flat position of a tensor of `numel` entries takes."""
    return max(1, (numel - 1).bit_length())


def _encode_sparse(delta: Delta, st: PackSettings, moment: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    if not isinstance(delta, SparseDelta):
        raise SkillPackError("the sparse scheme takes a sparse adapter's delta")
    bits = index_bits(math.prod(delta.shape))
    return ({"index": pack_uints(delta.index, bits), "value": delta.values.half()},
            {"shape": list(delta.shape), "kept": delta.kept, "index_bits": bits})


class SparseEntry(_Entry):
    scheme: Literal["sparse"]
    kept: PositiveInt
    index_bits: int = Field(ge=1, le=62)

    @model_validator(mode="after")
    def _fits(self) -> "SparseEntry":
        if self.kept > math.prod(self.shape) or self.index_bits != index_bits(math.prod(self.shape)):
            raise ValueError(f"kept {self.kept} entries at {self.index_bits} bits do not fit a tensor of shape {self.shape}")
        return self


def _sparse_layout(e: SparseEntry) -> Layout:
    return {"index": ("U8", (-(-e.kept * e.index_bits // 8),)), "value": ("F16", (e.kept,))}


def _sparse_positions(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    idx = unpack_uints(t["index"], meta["index_bits"], meta["kept"])
    if len(idx) and int(idx.max()) >= math.prod(meta["shape"]):
        raise SkillPackError(f"sparse entry of shape {meta['shape']} has an index outside the tensor")
    return idx


def _decode_sparse(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    out = torch.zeros(math.prod(meta["shape"]))
    out[_sparse_positions(t, meta)] = t["value"].float()
    return out.view(meta["shape"])


SCHEMES.register("svd_quant")(Scheme(_encode_svd_quant, _decode_svd_quant, SvdQuantEntry, _svd_layout))
SCHEMES.register("magnitude_prune")(Scheme(_encode_magnitude_prune, _decode_magnitude_checked, MagnitudePruneEntry, _magnitude_layout))
SCHEMES.register("sparse")(Scheme(_encode_sparse, _decode_sparse, SparseEntry, _sparse_layout))
SCHEMES.register("dense")(Scheme(_encode_dense, lambda t, meta: t["value"].float().view(meta["shape"]), DenseEntry,
                                 lambda e: {"value": ("F16", tuple(e.shape))}))


def scheme_for(key: str, delta: Delta) -> str:
    """The module-aware choice of compression for one tensor (a sparse adapter's delta stays sparse)."""
    if isinstance(delta, SparseDelta):
        return "sparse"
    if any(m in key for m in EMBEDDING_MARKERS):
        return "magnitude_prune"
    return "svd_quant" if len(_shape(delta)) == 2 else "dense"


def _shape(delta: Delta) -> tuple[int, ...]:
    return tuple(delta.shape)


@dataclass
class SkillPack:
    """A compressed skill delta plus its manifest; `delta(key)` gives the dequantized ΔW."""

    manifest: dict
    tensors: dict[str, torch.Tensor] = field(repr=False)
    folder: Path | None = None

    def keys(self) -> list[str]:
        return list(self.manifest["tensors"])

    def __contains__(self, key: str) -> bool:
        return key in self.manifest["tensors"]

    def delta(self, key: str) -> torch.Tensor:
        entry = self.manifest["tensors"][key]
        return SCHEMES.get(entry["scheme"]).decode(self.stored(key), entry)

    def stored(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one entry, by their local names (e.g. 's', 'u0.codes')."""
        return {name.split("::", 1)[1]: self.tensors[name] for name in self.manifest["tensors"][key]["stored"]}

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U of shape (out, r), V of shape (in, r)), dequantized, so ΔW = U @ V.T; None unless svd_quant.

        Lets a delta be applied as (x @ V) @ U.T without ever forming the dense (out, in) matrix.
        """
        entry = self.manifest["tensors"][key]
        if entry["scheme"] != "svd_quant":
            return None
        return _svd_factors(self.stored(key), entry)

    def positions(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat positions, fp16 values) of an entry that stores only some entries of its tensor; None for others.

        Lets a sparse delta be applied as a sparse matrix without forming the dense one.
        """
        entry = self.manifest["tensors"][key]
        t = self.stored(key)
        if entry["scheme"] == "sparse":
            return _sparse_positions(t, entry), t["value"]
        if entry["scheme"] == "magnitude_prune":
            return t["index"].long(), t["value"]
        return None

    @property
    def name(self) -> str:
        return self.manifest["skill"]

    @property
    def digest(self) -> str:
        """SHA-256 of what the pack holds (its manifest without file checksums, and every stored tensor): the
        same for a pack in memory and for it saved and loaded again, different for any other pack."""
        body = {k: v for k, v in self.manifest.items() if k not in ("checksums", "content_hash")}
        body["stored_sha256"] = {n: tensor_digest(t) for n, t in sorted(self.tensors.items())}
        return manifest_hash(body)

    def save(self, folder: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (),
             sign_with: str | Path | None = None) -> Path:
        """Write the pack to `folder` atomically (`graft.atomic.atomic_dir`: `inputs` are never replaced),
        signed with the private key file `sign_with` when given (`graft.signing`)."""
        with atomic_dir(folder, overwrite=overwrite, inputs=inputs, kind="skillpack") as tmp:
            self.write_into(tmp)
            if sign_with is not None:
                sign_folder(tmp, sign_with)
        self.folder = Path(folder)
        return self.folder

    def write_into(self, folder: Path) -> None:
        """Write pack.safetensors and skillpack.json into an existing folder (caller owns atomicity)."""
        save_file(self.tensors, str(folder / PAYLOAD), metadata={"format": FORMAT})
        manifest = dict(self.manifest)
        manifest["checksums"] = payload_checksums(folder, NOT_PAYLOAD)
        manifest["content_hash"] = manifest_hash(manifest)
        validate(manifest, SkillPackManifest, str(folder / MANIFEST))  # never write what load would refuse
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
        self.manifest = manifest

    @classmethod
    def load(cls, folder: str | Path) -> "SkillPack":
        """Read a pack folder, refusing (SkillPackError naming the file and field) anything it cannot vouch for."""
        folder = Path(folder)
        manifest = read_pack_manifest(folder)
        return cls(manifest, _load_payload(folder, manifest), folder)


def read_pack_manifest(folder: Path) -> dict:
    """The manifest of a pack folder, checked by schema, content hash, checksums and per-scheme entries."""
    mpath = folder / MANIFEST
    try:
        model = parse_json(mpath, SkillPackManifest, "SkillPack")
    except ArtifactError as e:
        raise SkillPackError(str(e)) from None
    manifest = json.loads(mpath.read_bytes())
    if model.content_hash != manifest_hash(manifest):
        raise SkillPackError(f"{mpath}: content_hash: does not match the manifest (the manifest was modified)")
    for key, entry in manifest["tensors"].items():
        if entry.get("scheme") not in SCHEMES:
            raise SkillPackError(f"{mpath}: tensors.{key}.scheme: unknown compression scheme {entry.get('scheme')!r}; "
                                 f"known: {', '.join(SCHEMES.names())}")
        try:
            validate(entry, SCHEMES.get(entry["scheme"]).entry, f"{mpath}: tensors.{key}")
        except ArtifactError as e:
            raise SkillPackError(str(e)) from None
    try:
        verify_payload(folder, model.checksums, NOT_PAYLOAD, mpath)
    except ArtifactError as e:
        raise SkillPackError(str(e)) from None
    return manifest


def _load_payload(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """pack.safetensors, after checking it holds exactly the tensors the entries imply, with their dtypes and shapes."""
    path = folder / PAYLOAD
    try:
        entries, _ = read_header(path)
    except (OSError, SafetensorsError) as e:
        raise SkillPackError(f"{path}: not a readable safetensors file ({e})") from None
    expected: dict[str, tuple[str, tuple[int, ...]]] = {}
    for key, entry in manifest["tensors"].items():
        scheme = SCHEMES.get(entry["scheme"])
        layout = scheme.layout(scheme.entry.model_validate(entry))
        if sorted(entry["stored"]) != sorted(f"{key}::{n}" for n in layout):
            raise SkillPackError(f"{folder / MANIFEST}: tensors.{key}.stored: expected {sorted(layout)} for its scheme")
        expected.update({f"{key}::{n}": spec for n, spec in layout.items()})
    for name in sorted(set(entries) | set(expected)):
        if name not in expected:
            raise SkillPackError(f"{path}: tensor {name!r} belongs to no manifest entry")
        if name not in entries:
            raise SkillPackError(f"{path}: tensor {name!r} is missing")
        got = (NAMES[entries[name].dtype], tuple(entries[name].shape))
        if got != expected[name]:
            raise SkillPackError(f"{path}: tensor {name!r} is {got[0]} {list(got[1])}, its entry implies "
                                 f"{expected[name][0]} {list(expected[name][1])}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' own error type, for a file its reader refuses
        raise SkillPackError(f"{path}: not a readable safetensors file ({e})") from None


def _nbytes(local: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in local.values())


def svd_entry_bytes(shape: tuple[int, int], k: int, st: PackSettings) -> int:
    """The exact bytes an svd_quant entry of rank k takes: bit-packed U and V codes per band, plus their grids."""
    rows, cols = shape
    return sum(-(-rows * n * b // 8) + -(-cols * n * b // 8) + 2 * n * GRID_BYTES
               for n, b in zip(_bands(k, st.band_fractions), st.bits) if n)


MomentOf = Callable[[str], torch.Tensor | None]


def _encode_within_budget(deltas: dict[str, Delta], moment_of: MomentOf, importance: dict[str, torch.Tensor],
                          st: PackSettings, budget: float) -> dict[str, tuple[dict[str, torch.Tensor], dict]]:
    """svd_quant entries of all `deltas` in at most `budget` bytes: ranks by `allocate_ranks`, trimmed one
    direction at a time (the least value per byte first) until their exact bytes fit, then encoded once."""
    factors = {k: factorize(d, _weighting(st, moment_of(k) if st.weighted_svd else None)) for k, d in sorted(deltas.items())}
    costs = {k: rank_bytes(f.shape, st) for k, f in factors.items()}
    value = RANK_VALUES.get(st.allocation)
    values = {}
    for k, f in factors.items():
        try:
            values[k] = value(f, importance.get(k))
        except SkillPackError as e:
            raise SkillPackError(f"tensor {k!r}: {e}") from None
    ranks = allocate_ranks(values, costs, budget)
    while sum(svd_entry_bytes(factors[k].shape, r, st) for k, r in ranks.items()) > budget:
        k = min((k for k in ranks if ranks[k] > 0), key=lambda k: float(values[k][ranks[k] - 1]) / costs[k])
        ranks[k] -= 1
    calibrated = QUANTIZERS.get(st.quantizer).calibrated
    return {k: encode_factors(deltas[k], factors[k], ranks[k], st, moment_of(k) if calibrated else None) for k in factors}


def pack_skill(skill: str, deltas: dict[str, Delta], base_fingerprint: dict, settings: PackSettings,
               source: dict | None = None, calibration: Mapping[str, torch.Tensor] | None = None,
               importance: dict[str, torch.Tensor] | None = None) -> SkillPack:
    """Compress `deltas` (keyed by base tensor name) into a SkillPack for the fingerprinted base.

    `calibration` (each layer's input second moment, keyed like `deltas`: `graft.calibration.input_moments`,
    or `LayerMoments` to compute them a layer at a time) is used by calibrated quantizers (`gptq`) and by
    `weighted_svd`, for the matrices it covers; it is read in key order, and only by the steps that use it.
    With `settings.budget`, the pack holds at most that fraction of the bf16 delta's bytes, and
    `importance` (the skill's per-entry scores, `graft.importance`, keyed like `deltas`) feeds
    importance-aware rank allocation (`settings.allocation`).
    """
    try:
        safe_name(skill)
    except ValueError as e:
        raise SkillPackError(f"skill name: {e}") from None
    uses_moments = settings.needs_calibration
    if uses_moments and not calibration:
        raise SkillPackError(f"quantizer {settings.quantizer!r}{' with weighted_svd' if settings.weighted_svd else ''} "
                             "needs calibration moments (graft.calibration.input_moments)")

    def moment_of(key: str) -> torch.Tensor | None:
        if calibration is None or key not in calibration:
            return None
        moment, n = calibration[key], _shape(deltas[key])[-1]
        if tuple(moment.shape) != (n, n):
            raise SkillPackError(f"calibration moment for tensor {key!r} has shape {tuple(moment.shape)}, expected ({n}, {n})")
        return moment

    schemes = {}
    for key in sorted(deltas):
        delta = deltas[key]
        if isinstance(delta, LowRankDelta):
            check = delta.A.abs().sum() + delta.B.abs().sum()
        else:
            check = (delta.values if isinstance(delta, SparseDelta) else delta).abs().sum()
        if not torch.isfinite(check):
            raise SkillPackError(f"delta for tensor {key!r} holds NaN or Inf")
        schemes[key] = scheme_for(key, delta)
    encoded = {k: SCHEMES.get(schemes[k]).encode(deltas[k], settings, moment_of(k) if uses_moments else None)
               for k in schemes if settings.budget is None or schemes[k] != "svd_quant"}
    bf16_total = sum(2 * math.prod(_shape(d)) for d in deltas.values())
    if settings.budget is not None:
        left = settings.budget * bf16_total - sum(_nbytes(t) for t, _ in encoded.values())
        if left < 0:
            raise SkillPackError(f"budget {settings.budget:g} of the bf16 delta ({settings.budget * bf16_total:.0f} bytes) is less "
                                 f"than the tensors kept without SVD take ({', '.join(k for k in encoded)})")
        matrices = {k: deltas[k] for k in schemes if schemes[k] == "svd_quant"}
        for k in matrices:
            if importance and k in importance and tuple(importance[k].shape) != _shape(deltas[k]):
                raise SkillPackError(f"importance score for tensor {k!r} has shape {tuple(importance[k].shape)}, "
                                     f"expected {_shape(deltas[k])}")
        encoded.update(_encode_within_budget(matrices, moment_of, importance or {}, settings, left))
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for key in sorted(encoded):
        local, meta = encoded[key]
        tensors.update({f"{key}::{n}": t.contiguous() for n, t in local.items()})
        entries[key] = {"scheme": schemes[key], **meta, "bytes": _nbytes(local),
                        "bf16_bytes": 2 * math.prod(meta["shape"]), "stored": [f"{key}::{n}" for n in local]}
    warnings = [f"{key}: {settings.quantizer} fell back to round-to-nearest ({e['fallback']})"
                for key, e in entries.items() if e.get("fallback")]
    if settings.weighted_svd:
        warnings += [f"{key}: weighted_svd fell back to an unweighted SVD "
                     f"({_uncalibrated(deltas[key], calibration is not None and key in calibration)})"
                     for key, e in entries.items() if e["scheme"] == "svd_quant" and not e["weighted_svd"]]
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "skill": skill,
        "base_fingerprint": base_fingerprint,
        "settings": {"energy": settings.energy, "bits": list(settings.bits),
                     "band_fractions": list(settings.band_fractions), "keep_fraction": settings.keep_fraction,
                     "budget": settings.budget, "allocation": settings.allocation if settings.budget is not None else None,
                     "quantizer": settings.quantizer, "weighted_svd": settings.weighted_svd,
                     "calibrated": bool(calibration) and uses_moments},
        "source": source or {},
        "tensors": entries,
        "total_bytes": sum(e["bytes"] for e in entries.values()),
        "delta_bf16_bytes": bf16_total,
        "warnings": warnings,
    }
    return SkillPack(manifest, tensors)
