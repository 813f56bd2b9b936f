"""Quantization of matrix columns to 1–8 bits, bit-packed into bytes.

Each column gets its own asymmetric grid (min and step, kept in fp16), its range clipped where that
lowers the column's squared rounding error. Codes are packed as one bit stream, `bits` bits per code,
so the bytes on disk really are the compressed size (3 bits per code take 3/8 of a byte, not a half).

Two ways to choose the codes, registered by name in `QUANTIZERS`:
- `rtn`: round each entry to the nearest grid point;
- `gptq`: GPTQ (Frantar et al. 2022) for a matrix that multiplies inputs with second moment H: entries
  are rounded one input dimension at a time and each rounding error is pushed onto the dimensions not
  yet rounded, through H⁻¹, so the error in the *output* on such inputs is what gets minimized. It runs
  as the blocked algorithm in fp32 on the matrix's device: H is damped and inverted through Cholesky
  factors, each input dimension is rounded for all outputs at once, and the errors of a block of
  BLOCK dimensions reach the dimensions after it in one matrix product. An H that cannot be factorized
  even with extra damping raises `UnusableHessian`; the caller decides what to round with instead and
  records it (`graft.skillpack` falls back to `rtn` and writes a warning into the pack's manifest).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from graft.registry import Registry

VALID_BITS = tuple(range(1, 9))
CLIP_FACTORS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5 of each column's half-range
DAMPING = 0.01  # GPTQ: fraction of the mean diagonal added to H, so H⁻¹ exists when inputs are degenerate
RETRY_DAMPING = 0.1  # GPTQ: the damping of the one retry when H + DAMPING is not positive definite in fp32
BLOCK = 128  # GPTQ: input dimensions rounded together before their errors reach the rest in one matrix product
TIE_BAND = 2.0**-12  # fp32 quotients this close to a half-integer are redone in float64 (`_nearest`)


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
    lo, step, top = lo.to(x.device), step.to(x.device), _top(bits, x.device)
    if x.dtype == torch.float64:
        return torch.minimum(torch.round((x - lo.double()) / step.double()).clamp_(min=0), top).long()
    return _codes(x.float(), lo.float(), step.float(), top).long()


def _top(bits: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The largest code of `bits` bits (one number or one per column), as fp32 on `device`."""
    return torch.as_tensor(bits, device=device).exp2() - 1


def _codes(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`round_to_grid` in fp32 (lo, step: the fp16 grid held as fp32), codes as exact fp32 integers."""
    return torch.minimum(_nearest(x, lo, step).clamp_(min=0), top)


def _nearest(x: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """round((x − lo) / step) for fp32 x, as exact arithmetic (and the float64 this replaced) gives it.

    The fp32 quotient is within 2⁻²³·|q| of the exact one, under 2⁻¹⁴ wherever a code is not clamped
    (|q| ≤ 256.5): it can round the other way only within TIE_BAND of a half-integer, and those few
    entries are recomputed in float64.
    """
    t = (x - lo) / step
    codes = torch.round(t)
    near = (t - codes).abs() > 0.5 - TIE_BAND
    if near.any():
        shape = t.shape
        exact = (torch.broadcast_to(x, shape)[near].double() - torch.broadcast_to(lo, shape)[near].double()) \
            / torch.broadcast_to(step, shape)[near].double()
        codes[near] = torch.round(exact).float()
    return codes


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
    """`quantize(m, bits, hessian, along)` → (codes, min, step); `calibrated`: it uses the input moments, and
    raises UnusableHessian when it cannot (the caller picks what to do instead and records it)."""

    quantize: Callable[[torch.Tensor, Sequence[int], torch.Tensor | None, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    calibrated: bool


# A quantizer turns a matrix M (rows × cols, quantized per column, `bits[j]` bits for column j) into
# integer codes and its per-column grid. `hessian` is the second moment of the inputs M multiplies,
# over M's rows (`along="rows"`: the product is Mᵀx, as for V in U Vᵀ x) or over its columns
# (`along="cols"`: the product is M z, as for U); rtn ignores it.
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def _grids(m: torch.Tensor, bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.empty(m.shape[1], dtype=torch.float16, device=m.device)
    step = torch.empty(m.shape[1], dtype=torch.float16, device=m.device)
    for b in bits.unique().tolist():
        cols = (bits == b).to(m.device)
        lo[cols], step[cols] = column_grid(m[:, cols], int(b))
    return lo, step


def rtn(m: torch.Tensor, bits: Sequence[int], hessian: torch.Tensor | None = None,
        along: str = "rows") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest of every column of `m` on its own clipped grid; `hessian` and `along` are ignored."""
    bits = torch.as_tensor(bits)
    lo, step = _grids(m, bits)
    return round_to_grid(m, lo, step, bits), lo, step


class UnusableHessian(ValueError):
    """GPTQ cannot round against this input second moment (none given, not finite, or not positive
    definite even with extra damping); the message says which."""


def _inverse_cholesky(hessian: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ in fp32 on `device`: the GPTQ update rows.

    λ = DAMPING · mean(diag H), once more with RETRY_DAMPING if fp32 finds H + λI not positive definite.
    Inputs never driven (a zero diagonal) get a unit diagonal, so H stays invertible.
    """
    n = hessian.shape[0]
    h = hessian.to(device=device, dtype=torch.float32, copy=True)
    if not torch.isfinite(h).all():
        raise UnusableHessian(f"the {n}×{n} input second moment holds NaN or Inf")
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    mean = diag.mean()
    added = 0.0
    for damping in (DAMPING, RETRY_DAMPING):
        diag.add_((damping - added) * mean)
        added = damping
        low, info = torch.linalg.cholesky_ex(h)
        if info.item() == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(low), upper=True)
            if info.item() == 0 and torch.isfinite(upper).all():
                return upper
    raise UnusableHessian(f"the {n}×{n} input second moment is not positive definite in fp32 "
                          f"even with damping {RETRY_DAMPING:g} of its mean diagonal")


def _gptq_sweep(w: torch.Tensor, hinv: torch.Tensor, round_input: Callable[[int, torch.Tensor], torch.Tensor]) -> None:
    """Blocked GPTQ over `w` (input dimensions × outputs, fp32, updated in place).

    Row i (one input dimension, all outputs) is rounded by `round_input(i, row)`, which returns the
    values it stands for; its error, scaled by the update row hinv[i], goes at once to the rows after it
    in the same block and, lazily, as one matrix product to all rows after the block.
    """
    n = w.shape[0]
    for start in range(0, n, BLOCK):
        end = min(start + BLOCK, n)
        block, h = w[start:end], hinv[start:end, start:end]
        errs = torch.empty_like(block)
        for j in range(end - start):
            err = (block[j] - round_input(start + j, block[j])) / h[j, j]
            block[j + 1:].addr_(h[j, j + 1:], err, alpha=-1)
            errs[j] = err
        w[end:].addmm_(hinv[start:end, end:].T, errs, alpha=-1)


def gptq(m: torch.Tensor, bits: Sequence[int], hessian: torch.Tensor | None,
         along: str = "rows") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ codes and grids of `m` for inputs of second moment `hessian` (see QUANTIZERS for `along`).

    `along="rows"`: the grids are fitted to `m` up front, then its rows are rounded in turn. `along="cols"`:
    its columns are rounded in turn, each on a grid fitted to the column as the earlier errors left it.
    Raises UnusableHessian when `hessian` is None or cannot be factorized.
    """
    if hessian is None:
        raise UnusableHessian("no calibration moment")
    if along not in ("rows", "cols"):
        raise ValueError(f"along must be 'rows' or 'cols', got {along!r}")
    bits = torch.as_tensor(bits)
    w = (m if along == "rows" else m.T).to(torch.float32).clone(memory_format=torch.contiguous_format)
    if tuple(hessian.shape) != (w.shape[0], w.shape[0]):
        raise ValueError(f"GPTQ along {along}: a {tuple(m.shape)} matrix needs a {w.shape[0]}×{w.shape[0]} "
                         f"input second moment, got {tuple(hessian.shape)}")
    hinv = _inverse_cholesky(hessian, m.device)
    codes = torch.empty(w.shape, dtype=torch.long, device=m.device)
    if along == "rows":
        lo, step = _grids(m, bits)
        lo32, step32, top = lo.float(), step.float(), _top(bits, m.device)

        def round_input(i: int, row: torch.Tensor) -> torch.Tensor:
            c = _codes(row, lo32, step32, top)
            codes[i] = c
            return c * step32 + lo32

        _gptq_sweep(w, hinv, round_input)
        return codes, lo, step
    lo = torch.empty(m.shape[1], dtype=torch.float16, device=m.device)
    step = torch.empty(m.shape[1], dtype=torch.float16, device=m.device)

    def round_column(j: int, column: torch.Tensor) -> torch.Tensor:
        b = int(bits[j])
        lo[j:j + 1], step[j:j + 1] = column_grid(column[:, None], b)
        lo_j, step_j = lo[j].float(), step[j].float()
        c = _codes(column, lo_j, step_j, _top(b, m.device))
        codes[j] = c
        return c * step_j + lo_j

    _gptq_sweep(w, hinv, round_column)
    return codes.T.contiguous(), lo, step


QUANTIZERS.register("rtn")(Quantizer(rtn, calibrated=False))
QUANTIZERS.register("gptq")(Quantizer(gptq, calibrated=True))
