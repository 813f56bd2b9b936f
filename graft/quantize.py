"""Round-to-nearest quantization of matrix columns to 2, 4 or 8 bits, bit-packed into bytes.

Each column gets its own asymmetric range (min and step, kept in fp16). Codes are packed 8/bits to
a byte, so the bytes on disk really are the compressed size.
"""

from __future__ import annotations

import torch

VALID_BITS = (2, 4, 8)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2**bits) into a flat uint8 tensor."""
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits}")
    flat = codes.reshape(-1).to(torch.uint8)
    per = 8 // bits
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    flat = flat.view(-1, per)
    out = torch.zeros(flat.shape[0], dtype=torch.uint8)
    for i in range(per):
        out |= flat[:, i] << (bits * i)
    return out


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per = 8 // bits
    mask = (1 << bits) - 1
    cols = [(packed >> (bits * i)) & mask for i in range(per)]
    return torch.stack(cols, dim=1).reshape(-1)[:numel]


def quantize_columns(x: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Quantize each column of a 2-D tensor; returns packed codes, per-column min and step."""
    x = x.float()
    lo = x.min(dim=0).values
    hi = x.max(dim=0).values
    step = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-12)
    lo16, step16 = lo.half(), step.half()
    # quantize against the fp16 parameters actually stored, so decode matches encode exactly
    codes = torch.round((x - lo16.float()) / step16.float().clamp_min(1e-12)).clamp(0, (1 << bits) - 1)
    return {"codes": pack_bits(codes, bits), "min": lo16, "step": step16}


def dequantize_columns(q: dict[str, torch.Tensor], bits: int, shape: tuple[int, int]) -> torch.Tensor:
    codes = unpack_bits(q["codes"], bits, shape[0] * shape[1]).float().view(shape)
    return codes * q["step"].float() + q["min"].float()
