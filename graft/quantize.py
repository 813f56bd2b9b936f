"""Quantization of matrix columns to 1–8 bits, bit-packed into bytes.

Each column gets its own asymmetric grid (min and step, kept in fp16), its range clipped where that
lowers the column's squared rounding error. Codes are packed as one bit stream, `bits` bits per code,
so the bytes on disk really are the compressed size (3 bits per code take 3/8 of a byte, not a half).

Two ways to choose the codes, registered by name in `QUANTIZERS`:
- `rtn`: round each entry to the nearest grid point;
- `gptq`: GPTQ (Frantar et al. 2022) for a matrix that multiplies inputs with second moment H: entries
  are rounded one input dimension at a time and each rounding error is pushed onto the dimensions not
  yet rounded, through H⁻¹, so the error in the *output* on such inputs is what gets minimized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from graft.registry import Registry

VALID_BITS = tuple(range(1, 9))
CLIP_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5 of each column's half-range
DAMPING = 0.01  # GPTQ: fraction of the mean diagonal added to H, so H⁻¹ exists when inputs are degenerate


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor of ceil(n·bits/8) bytes."""
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits}")
    return pack_uints(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The `numel` codes of `pack_bits` output, as int64."""
    return unpack_uints(packed, bits, numel)


PACK_CHUNK = 1 << 20  # codes per step: bounds the bit stream held at once to chunk·bits int64s


def pack_uints(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Non-negative integers below 2**bits (1 ≤ bits ≤ 62), packed little-endian into ceil(n·bits/8) bytes, in chunks."""
    if not 1 <= bits <= 62:
        raise ValueError(f"bits must be in 1..62, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    out = []
    for start in range(0, max(1, flat.numel()), PACK_CHUNK):  # PACK_CHUNK·bits is a multiple of 8: chunks end on byte bounds
        stream = ((flat[start:start + PACK_CHUNK, None] >> torch.arange(bits)) & 1).reshape(-1)
        pad = (-stream.numel()) % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8))
    return torch.cat(out)


def unpack_uints(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """The `numel` integers of `pack_uints` output, as int64."""
    out = []
    step = PACK_CHUNK * bits // 8
    for i, start in enumerate(range(0, max(1, numel), PACK_CHUNK)):
        n = min(PACK_CHUNK, numel - start)
        chunk = packed[i * step:i * step + -(-n * bits // 8)]
        stream = ((chunk.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)[: n * bits]
        out.append((stream.view(n, bits) << torch.arange(bits)).sum(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


def column_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (min, step) in fp16: 2**bits levels over each column's range, shrunk about its middle by
    whichever of CLIP_FACTORS gives the least squared rounding error (a few clipped outliers buy a finer
    step for all other entries; at 3 bits this matters)."""
    x = x.float()
    lo0, hi0 = x.min(dim=0).values, x.max(dim=0).values
    mid, half = (lo0 + hi0) / 2, (hi0 - lo0) / 2
    best_lo = best_step = best_err = None
    for factor in CLIP_FACTORS:
        lo = (mid - factor * half).half()
        step = (2 * factor * half / ((1 << bits) - 1)).clamp_min(1e-12).half().clamp_min(torch.finfo(torch.float16).tiny)
        err = (from_grid(round_to_grid(x, lo, step, bits), lo, step) - x).pow(2).sum(dim=0)
        if best_err is None:
            best_lo, best_step, best_err = lo, step, err
            continue
        better = err < best_err
        best_lo, best_step, best_err = torch.where(better, lo, best_lo), torch.where(better, step, best_step), torch.minimum(err, best_err)
    return best_lo, best_step


def round_to_grid(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Integer codes of `x` on the stored fp16 grid (broadcast over rows; `bits` one number or one per column)."""
    top = (1 << bits) - 1 if isinstance(bits, int) else (2 ** bits.double() - 1)
    codes = torch.round((x.double() - lo.double()) / step.double()).clamp(min=0)
    return torch.minimum(codes, torch.as_tensor(top, dtype=torch.float64)).long()


def from_grid(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The values integer codes stand for on a (min, step) grid, in float32."""
    return codes.float() * step.float() + lo.float()


def encode_codes(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """The stored form of quantized columns: bit-packed codes plus the fp16 grid."""
    return {"codes": pack_bits(codes, bits), "min": lo, "step": step}


def quantize_columns(x: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Round-to-nearest of each column of a 2-D tensor; returns packed codes, per-column min and step."""
    return encode_codes(*rtn(x, [bits] * x.shape[1]), bits)


def dequantize_columns(q: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]) -> torch.Tensor:
    return from_grid(unpack_bits(q["codes"], bits, shape[0] * shape[1]).view(shape), q["min"], q["step"])


@dataclass(frozen=True)
class Quantizer:
    """`quantize(m, bits, hessian, along)` → (codes, min, step); `calibrated`: it uses the input moments."""

    quantize: Callable[[torch.Tensor, Sequence[int], torch.Tensor | None, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    calibrated: bool


# A quantizer turns a matrix M (rows × cols, quantized per column, `bits[j]` bits for column j) into
# integer codes and its per-column grid. `hessian` is the second moment of the inputs M multiplies,
# over M's rows (`along="rows"`: the product is Mᵀx, as for V in U Vᵀ x) or over its columns
# (`along="cols"`: the product is M z, as for U); rtn ignores it.
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def _grids(m: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo, step = torch.empty(m.shape[1], dtype=torch.float16), torch.empty(m.shape[1], dtype=torch.float16)
    for b in bits.unique().tolist():
        cols = bits == b
        lo[cols], step[cols] = column_grid(m[:, cols], int(b))
    return lo, step


def rtn(m: torch.Tensor, bits: Sequence[int], hessian: torch.Tensor | None = None, along: str = "rows"):
    bits = torch.as_tensor(bits)
    lo, step = _grids(m, bits)
    return round_to_grid(m, lo, step, bits), lo, step


def _inverse_cholesky(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)⁻¹, the GPTQ update rows."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq(m: torch.Tensor, bits: Sequence[int], hessian: torch.Tensor | None, along: str = "rows"):
    if hessian is None:
        return rtn(m, bits)
    hinv = _inverse_cholesky(hessian)
    bits = torch.as_tensor(bits)
    w = m.double().clone()
    codes = torch.zeros_like(w, dtype=torch.long)
    if along == "rows":  # grids fixed up front; rows (input dimensions) rounded in turn
        lo, step = _grids(m, bits)
        for i in range(w.shape[0]):
            codes[i] = round_to_grid(w[i], lo, step, bits)
            err = (w[i] - from_grid(codes[i], lo, step).double()) / hinv[i, i]
            w[i + 1:] -= hinv[i, i + 1:, None] * err[None, :]
        return codes, lo, step
    # along == "cols": columns rounded in turn, each on a grid fitted to it as it stands then
    lo, step = torch.empty(w.shape[1], dtype=torch.float16), torch.empty(w.shape[1], dtype=torch.float16)
    for j in range(w.shape[1]):
        lo[j:j + 1], step[j:j + 1] = column_grid(w[:, j:j + 1], int(bits[j]))
        codes[:, j] = round_to_grid(w[:, j], lo[j], step[j], int(bits[j]))
        err = (w[:, j] - from_grid(codes[:, j], lo[j], step[j]).double()) / hinv[j, j]
        w[:, j + 1:] -= err[:, None] * hinv[j, j + 1:][None, :]
    return codes, lo, step


QUANTIZERS.register("rtn")(Quantizer(rtn, calibrated=False))
QUANTIZERS.register("gptq")(Quantizer(gptq, calibrated=True))
