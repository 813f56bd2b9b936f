"""Artifact folders graftline reads back: schema-checked manifests, checksums over every payload file.

Everything here turns a damaged or hostile folder into one `ArtifactError` line that names the file
and the field: a manifest is parsed by a pydantic model, names and paths in it are confined to the
folder, and every file in the folder other than the manifest and graftline's own records must carry
a checksum in it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError

RESERVED_NAMES = frozenset({"none"})  # the router's class for prompts of no skill
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
M = TypeVar("M", bound=BaseModel)


class ArtifactError(ValueError):
    """A folder graftline refuses to read or trust; the message names the file and the field."""


def safe_name(value: str) -> str:
    """A name that is one safe path component: letters, digits, `_`, `-`, `.`, not starting with `.`, not `none`."""
    if not isinstance(value, str) or not _NAME.match(value) or value.lower() in RESERVED_NAMES:
        raise ValueError(f"{value!r} is not a safe name (letters, digits, '_', '-', '.', not starting with '.' or "
                         f"'-', at most 100 characters, not {', '.join(sorted(RESERVED_NAMES))})")
    return value


def relative_path(value: str) -> str:
    """A relative POSIX path inside a folder: no `..`, no absolute path, no empty or hidden parts."""
    parts = PurePosixPath(value).parts if isinstance(value, str) else ()
    if not parts or value.startswith("/") or "\\" in value or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"{value!r} is not a path inside the folder")
    return value


def sha256_hex(value: str) -> str:
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ValueError(f"{value!r} is not a SHA-256 hex digest")
    return value


SafeName = Annotated[str, AfterValidator(safe_name)]
RelPath = Annotated[str, AfterValidator(relative_path)]
Sha256 = Annotated[str, AfterValidator(sha256_hex)]


def field_path(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def describe(e: ValidationError) -> str:
    """The first problem of a pydantic error as `field.path: message`."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "missing"
    return f"{field_path(err['loc'])}: {msg}" if err["loc"] else msg  # a whole-model check names its field itself


def parse_json(path: Path, model: type[M], what: str, context: dict[str, Any] | None = None) -> M:
    """`path` parsed as `model`, or ArtifactError naming the file and the first bad field."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent}: no {path.name} (not a {what} folder)")
    try:
        data = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    return validate(data, model, str(path), context)


def validate(data: Any, model: type[M], source: str, context: dict[str, Any] | None = None) -> M:
    """`data` validated as `model`, or ArtifactError naming `source` and the first bad field."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{source}: expected a JSON object at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as e:
        raise ArtifactError(f"{source}: {describe(e)}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _payload_files(folder: Path, exclude: frozenset[str]) -> list[str]:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        if p.is_symlink():
            raise ArtifactError(f"{p}: symbolic links are not allowed in an artifact folder")
        if p.is_file():
            out.append(rel)
    return out


def payload_checksums(folder: Path, exclude: frozenset[str]) -> dict[str, str]:
    """SHA-256 of every file under `folder` (relative POSIX paths), but the `exclude`d ones."""
    return {rel: file_sha256(folder / rel) for rel in _payload_files(folder, exclude)}


def verify_payload(folder: Path, checksums: dict[str, str], exclude: frozenset[str], manifest: Path) -> None:
    """Every listed file inside `folder` with its digest, and every file there listed; else ArtifactError."""
    root = folder.resolve()
    for rel, digest in checksums.items():
        path = (folder / rel).resolve()
        if root not in path.parents:
            raise ArtifactError(f"{manifest}: checksums: {rel!r} is not a path inside the folder")
        if not path.is_file():
            raise ArtifactError(f"{folder / rel}: listed in {manifest.name} but missing")
        if file_sha256(path) != digest:
            raise ArtifactError(f"{folder / rel}: checksum mismatch (the file was modified or is corrupt)")
    for rel in _payload_files(folder, exclude):
        if rel not in checksums:
            raise ArtifactError(f"{folder / rel}: not covered by the checksums in {manifest.name}")


def manifest_hash(manifest: dict) -> str:
    """SHA-256 of a manifest's canonical JSON, without its own `content_hash`."""
    body = {k: v for k, v in manifest.items() if k != "content_hash"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
