"""SkillPacks (GraftLLM, methods.md §1): a skill's delta, compressed module by module, in one folder.

Module-aware compression of Δ = θ_after − θ_before:
- embeddings and LM head: magnitude pruning, the top-α fraction of entries kept (`magnitude_prune`);
- attention and MLP matrices: truncated SVD, rank = the smallest k holding a fraction β of Σσ²,
  then U and V quantized round-to-nearest by rank band, e.g. 8 bits for the leading columns and 4 or
  2 for the rest (`svd_quant`). Calibration-aware when given each layer's input scale
  s_j = sqrt(E[x_j²]) on the skill's data: the SVD is of Δ·diag(s), so the kept directions are the
  ones that move the layer's output on real inputs, not the largest in weight space (ΔW ≈ U Σ (V/s)ᵀ);
- vectors (norms, biases): fp16 (`dense`).
A folder holds `pack.safetensors` (the compressed tensors: bytes on disk are the compressed bytes)
and `skillpack.json` (format version, base fingerprint, per-tensor scheme and bytes, source info,
checksums). Loading verifies the checksums, so a tampered pack is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graft.atomic import atomic_dir
from graft.lora import LowRankDelta
from graft.quantize import dequantize_columns, quantize_columns
from graft.registry import Registry

FORMAT = "graftline.skillpack"
FORMAT_VERSION = 1
EMBEDDING_MARKERS = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out")

Delta = torch.Tensor | LowRankDelta


class SkillPackError(ValueError):
    """A SkillPack that cannot be made, read or applied; the message names the pack and tensor."""


@dataclass(frozen=True)
class PackSettings:
    energy: float = 0.95
    bits: tuple[int, ...] = (8, 4)
    band_fractions: tuple[float, ...] = (0.5, 0.5)
    keep_fraction: float = 0.1  # α for embeddings / head


@dataclass(frozen=True)
class Scheme:
    # encode(delta, settings, input_scale): input_scale is the layer's per-input-channel calibration scale, or None
    encode: Callable[[Delta, PackSettings, torch.Tensor | None], tuple[dict[str, torch.Tensor], dict]]
    decode: Callable[[dict[str, torch.Tensor], dict], torch.Tensor]


SCHEMES: Registry[Scheme] = Registry("compression scheme")


def _svd(delta: Delta, input_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
    """U, S, V with delta ≈ U diag(S) Vᵀ; for a LoRA delta through QR of the factors, never densifying B A.

    With `input_scale` (one value per input channel) the SVD is of delta·diag(scale), and V comes back
    divided by the scale, so U diag(S) Vᵀ is still the delta and S ranks directions by their effect on
    the layer's output.
    """
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
    return u, s, v, tuple(delta.shape)


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


def _encode_svd_quant(delta: Delta, st: PackSettings,
                      input_scale: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    u, s, v, shape = _svd(delta, input_scale)
    k = energy_rank(s, st.energy)
    tensors: dict[str, torch.Tensor] = {"s": s[:k].float().contiguous()}
    bands, start = [], 0
    for i, (n, bits) in enumerate(zip(_bands(k, st.band_fractions), st.bits)):
        if n == 0:
            continue
        for name, mat in (("u", u), ("v", v)):
            q = quantize_columns(mat[:, start:start + n], bits)
            tensors.update({f"{name}{i}.{part}": t for part, t in q.items()})
        bands.append({"band": i, "start": start, "cols": n, "bits": bits})
        start += n
    return tensors, {"shape": list(shape), "rank": k, "bands": bands, "calibrated": input_scale is not None}


def _svd_factors(t: dict[str, torch.Tensor], meta: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(U·diag(s), V) of an svd_quant entry, dequantized and joined across rank bands: ΔW = U Vᵀ."""
    rows, cols = meta["shape"]
    us, vs = [torch.zeros(rows, 0)], [torch.zeros(cols, 0)]
    for b in meta["bands"]:
        i, n = b["band"], b["cols"]
        us.append(dequantize_columns({p: t[f"u{i}.{p}"] for p in ("codes", "min", "step")}, b["bits"], (rows, n))
                  * t["s"][b["start"]:b["start"] + n])
        vs.append(dequantize_columns({p: t[f"v{i}.{p}"] for p in ("codes", "min", "step")}, b["bits"], (cols, n)))
    return torch.cat(us, dim=1), torch.cat(vs, dim=1)


def _decode_svd_quant(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    u, v = _svd_factors(t, meta)
    return u @ v.T


def _dense(delta: Delta) -> torch.Tensor:
    return delta.dense() if isinstance(delta, LowRankDelta) else delta.float()


def _encode_magnitude_prune(delta: Delta, st: PackSettings,
                            input_scale: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    d = _dense(delta)
    n = max(1, int(round(st.keep_fraction * d.numel())))
    idx = d.abs().reshape(-1).topk(n).indices.sort().values
    return {"index": idx.to(torch.int32), "value": d.reshape(-1)[idx].half()}, {"shape": list(d.shape), "kept": n}


def _decode_magnitude_prune(t: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    out = torch.zeros(math.prod(meta["shape"]))
    out[t["index"].long()] = t["value"].float()
    return out.view(meta["shape"])


def _encode_dense(delta: Delta, st: PackSettings, input_scale: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    d = _dense(delta)
    return {"value": d.half()}, {"shape": list(d.shape)}


SCHEMES.register("svd_quant")(Scheme(_encode_svd_quant, _decode_svd_quant))
SCHEMES.register("magnitude_prune")(Scheme(_encode_magnitude_prune, _decode_magnitude_prune))
SCHEMES.register("dense")(Scheme(_encode_dense, lambda t, meta: t["value"].float().view(meta["shape"])))


def scheme_for(key: str, delta: Delta) -> str:
    """The module-aware choice of compression for one tensor."""
    if any(m in key for m in EMBEDDING_MARKERS):
        return "magnitude_prune"
    return "svd_quant" if len(_shape(delta)) == 2 else "dense"


def _shape(delta: Delta) -> tuple[int, ...]:
    return tuple(delta.shape)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_hash(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


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
        return SCHEMES.get(entry["scheme"]).decode(self._stored(key), entry)

    def _stored(self, key: str) -> dict[str, torch.Tensor]:
        """The stored tensors of one entry, by their local names (e.g. 's', 'u0.codes')."""
        return {name.split("::", 1)[1]: self.tensors[name] for name in self.manifest["tensors"][key]["stored"]}

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(U·diag(s) of shape (out, r), V of shape (in, r)), dequantized, so ΔW = U @ V.T; None unless svd_quant.

        Lets a delta be applied as (x @ V) @ U.T without ever forming the dense (out, in) matrix.
        """
        entry = self.manifest["tensors"][key]
        if entry["scheme"] != "svd_quant":
            return None
        return _svd_factors(self._stored(key), entry)

    @property
    def name(self) -> str:
        return self.manifest["skill"]

    def save(self, folder: str | Path) -> Path:
        """Write the pack to `folder` atomically (temporary folder, then rename)."""
        with atomic_dir(folder) as tmp:
            self.write_into(tmp)
        self.folder = Path(folder)
        return self.folder

    def write_into(self, folder: Path) -> None:
        """Write pack.safetensors and skillpack.json into an existing folder (caller owns atomicity)."""
        save_file(self.tensors, str(folder / "pack.safetensors"), metadata={"format": FORMAT})
        manifest = dict(self.manifest)
        manifest["checksums"] = {"pack.safetensors": _sha256_file(folder / "pack.safetensors")}
        manifest["content_hash"] = _manifest_hash(manifest)
        (folder / "skillpack.json").write_text(json.dumps(manifest, indent=1))
        self.manifest = manifest

    @classmethod
    def load(cls, folder: str | Path) -> "SkillPack":
        folder = Path(folder)
        mpath = folder / "skillpack.json"
        manifest = read_manifest(mpath, FORMAT, FORMAT_VERSION, "SkillPack")
        if manifest.get("content_hash") != _manifest_hash(manifest):
            raise SkillPackError(f"{mpath}: manifest content hash mismatch (the manifest was modified)")
        for name, digest in manifest["checksums"].items():
            if _sha256_file(folder / name) != digest:
                raise SkillPackError(f"{folder / name}: checksum mismatch (the pack was modified or is corrupt)")
        return cls(manifest, load_file(str(folder / "pack.safetensors")), folder)


def read_manifest(path: Path, fmt: str, version: int, what: str) -> dict:
    """A folder's JSON manifest, refused (SkillPackError naming the file) if absent or of another format or newer version."""
    if not path.is_file():
        raise SkillPackError(f"{path.parent}: no {path.name} (not a {what} folder)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != fmt or manifest.get("format_version", 0) > version:
        raise SkillPackError(f"{path}: unsupported format {manifest.get('format')!r} v{manifest.get('format_version')}")
    return manifest


def pack_skill(skill: str, deltas: dict[str, Delta], base_fingerprint: dict, settings: PackSettings,
               source: dict | None = None, input_scales: dict[str, torch.Tensor] | None = None) -> SkillPack:
    """Compress `deltas` (keyed by base tensor name) into a SkillPack for the fingerprinted base.

    `input_scales` (from `graft.calibration.input_scales`, keyed like `deltas`) make the SVD
    calibration-aware for the matrices they cover.
    """
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    for key in sorted(deltas):
        delta = deltas[key]
        check = delta.A.abs().sum() + delta.B.abs().sum() if isinstance(delta, LowRankDelta) else delta.abs().sum()
        if not torch.isfinite(check):
            raise SkillPackError(f"delta for tensor {key!r} holds NaN or Inf")
        scheme = scheme_for(key, delta)
        scale = (input_scales or {}).get(key)
        if scale is not None and (scale.ndim != 1 or scale.numel() != _shape(delta)[-1]):
            raise SkillPackError(f"calibration scale for tensor {key!r} has shape {tuple(scale.shape)}, "
                                 f"expected ({_shape(delta)[-1]},)")
        local, meta = SCHEMES.get(scheme).encode(delta, settings, scale)
        stored = [f"{key}::{n}" for n in local]
        tensors.update({f"{key}::{n}": t.contiguous() for n, t in local.items()})
        nbytes = sum(t.numel() * t.element_size() for t in local.values())
        entries[key] = {"scheme": scheme, **meta, "bytes": nbytes,
                        "bf16_bytes": 2 * math.prod(meta["shape"]), "stored": stored}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "skill": skill,
        "base_fingerprint": base_fingerprint,
        "settings": {"energy": settings.energy, "bits": list(settings.bits),
                     "band_fractions": list(settings.band_fractions), "keep_fraction": settings.keep_fraction,
                     "calibrated": bool(input_scales)},
        "source": source or {},
        "tensors": entries,
        "total_bytes": sum(e["bytes"] for e in entries.values()),
        "delta_bf16_bytes": sum(e["bf16_bytes"] for e in entries.values()),
    }
    return SkillPack(manifest, tensors)
