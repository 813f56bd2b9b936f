"""The on-disk schemas of graftline's artifacts, as pydantic models.

A manifest is parsed by its model before anything in it is used: wrong shapes, unknown formats, a
list where a mapping belongs, a missing checksum map or a name that would leave the folder are each
refused as one line naming the file and the field (`graft.artifacts.parse_json`). Per-tensor entries
of a SkillPack are checked a second time against their compression scheme's own model
(`graft.skillpack.SCHEMES`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from graft.artifacts import RelPath, SafeName, Sha256

SKILLPACK_FORMAT, SKILLPACK_VERSION = "graftline.skillpack", 3  # v3: fingerprints hash every byte; checksums cover every file
ROUTED_FORMAT, ROUTED_VERSION = "graftline.routed", 2  # v2: covered by a content hash and checksums; never grants drift
GRAFTS_FORMAT, GRAFTS_VERSION = "graftline.grafts", 1
OLDER = {SKILLPACK_FORMAT: "its base fingerprint covers only the leading rows of each tensor",
         ROUTED_FORMAT: "it has no content hash and may grant base drift on its own say"}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Fingerprint(Strict):
    """What a base must be for a delta to apply: config fields, tensor shapes and per-tensor SHA-256."""

    architecture: dict[str, Any]
    shapes: dict[str, list[NonNegativeInt]]
    tensors_sha256: dict[str, Sha256]

    @model_validator(mode="after")
    def _same_tensors(self) -> "Fingerprint":
        if set(self.shapes) != set(self.tensors_sha256):
            odd = sorted(set(self.shapes) ^ set(self.tensors_sha256))[0]
            raise ValueError(f"tensor {odd!r} needs both a shape and a digest")
        return self


def _check_version(fmt: str, current: int, version: int) -> int:
    if version < current:
        raise ValueError(f"format v{version} is no longer accepted ({OLDER[fmt]}); make it again with this graftline")
    if version > current:
        raise ValueError(f"format v{version} is newer than this graftline reads (v{current}); upgrade graftline")
    return version


class TensorEntry(BaseModel):
    """The fields every SkillPack tensor entry has; its scheme's own model checks the rest."""

    model_config = ConfigDict(extra="allow", frozen=True)

    scheme: str
    shape: list[PositiveInt] = Field(min_length=1, max_length=2)
    stored: list[str]
    bytes: NonNegativeInt
    bf16_bytes: NonNegativeInt


class SkillPackManifest(Strict):
    """`skillpack.json`."""

    format: Literal["graftline.skillpack"]
    format_version: int
    skill: SafeName
    base_fingerprint: Fingerprint
    settings: dict[str, Any]
    source: dict[str, Any]
    tensors: dict[str, TensorEntry] = Field(min_length=1)
    total_bytes: NonNegativeInt
    delta_bf16_bytes: PositiveInt
    grid_tuning: dict[str, Any] | None = None
    warnings: list[str] = []  # what packing could not do as asked (e.g. a GPTQ fallback to round-to-nearest), one line each
    checksums: dict[RelPath, Sha256] = Field(min_length=1)
    content_hash: Sha256

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        return _check_version(SKILLPACK_FORMAT, SKILLPACK_VERSION, v)

    @model_validator(mode="after")
    def _entries_fit(self) -> "SkillPackManifest":
        shapes = self.base_fingerprint.shapes
        for key, entry in self.tensors.items():
            if key not in shapes:
                raise ValueError(f"tensors: {key!r} is not in base_fingerprint.shapes")
            if list(entry.shape) != list(shapes[key]):
                raise ValueError(f"tensors: {key!r} has shape {entry.shape}, base_fingerprint says {shapes[key]}")
            if any(not s.startswith(f"{key}::") for s in entry.stored):
                raise ValueError(f"tensors: {key!r} lists stored tensors of another entry")
        if "pack.safetensors" not in self.checksums:
            raise ValueError("checksums: pack.safetensors is not covered")
        return self


class RouterInfo(Strict):
    classes: list[str] = Field(min_length=2)
    layer: int
    hard: bool


class RoutedManifest(Strict):
    """`routed.json`: the base it was made for, its packs (each `packs/<skill>/`), the router."""

    format: Literal["graftline.routed"]
    format_version: int
    base: str
    base_fingerprint: Fingerprint
    packs: list[SafeName] = Field(min_length=1)
    router: RouterInfo
    checksums: dict[RelPath, Sha256] = Field(min_length=1)
    content_hash: Sha256

    @field_validator("format_version")
    @classmethod
    def _version(cls, v: int) -> int:
        return _check_version(ROUTED_FORMAT, ROUTED_VERSION, v)

    @model_validator(mode="after")
    def _consistent(self) -> "RoutedManifest":
        if len(set(self.packs)) != len(self.packs):
            raise ValueError(f"packs: names repeat: {self.packs}")
        if sorted(self.router.classes) != sorted([*self.packs, "none"]):
            raise ValueError(f"router: classes {self.router.classes} are not the packs plus 'none'")
        if "router.safetensors" not in self.checksums:
            raise ValueError("checksums: router.safetensors is not covered")
        return self


class GraftedPack(Strict):
    skill: SafeName
    pack_sha256: Sha256  # graft.skillpack.SkillPack.digest
    scale: float


class GraftRecord(Strict):
    """`graftline_grafts.json` in a grafted checkpoint: the packs in it, and the digests that make the record hold.

    `base_sha256`: the original base's digests of every tensor a recorded pack touches;
    `weights_sha256`: this folder's digests of the same tensors (the record describes these weights only).
    """

    format: Literal["graftline.grafts"]
    format_version: Literal[1]
    packs: list[GraftedPack]
    base_sha256: dict[str, Sha256]
    weights_sha256: dict[str, Sha256]

    @model_validator(mode="after")
    def _same_tensors(self) -> "GraftRecord":
        if set(self.base_sha256) != set(self.weights_sha256):
            raise ValueError("base_sha256 and weights_sha256 must cover the same tensors")
        return self


class AdapterConfig(BaseModel):
    """The fields of a PEFT `adapter_config.json` graftline reads (PEFT writes many more; they are kept)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    peft_type: Literal["LORA"] = "LORA"
    r: PositiveInt = 8
    lora_alpha: float = Field(8, gt=0)
    target_modules: list[str] | str | None = None
    use_rslora: bool = False
    use_dora: Literal[False] = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, PositiveInt] = {}
    alpha_pattern: dict[str, float] = {}
    base_model_name_or_path: str | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, v: Any) -> Any:
        return {} if v is None else v
