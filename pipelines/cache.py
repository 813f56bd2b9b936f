"""Content keys for stage outputs: the same inputs and spec give the same key, so a rerun skips.

A stage's output folder is `<run root>/<stage>/<item>-<key>`; it is written under a temporary
name and renamed when complete (`graft.atomic`), with a marker holding its key and metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Ref:
    """An input of a request: where it is (`path`) and what it is (`key`, its content key or digest).

    A request's content key hashes a Ref by its `key` only, so the same input found at another path
    (a moved run root, a copied file) gives the same key, and a changed input never does.
    """

    path: str
    key: str


# A request field's metadata for a field added after outputs were cached: while the field holds its default it is
# left out of the content key, so the outputs of requests made before it existed keep their keys and are reused.
KEYED_IF_SET = {"content_key": "if_set"}


def _keyed(o: Any, f: dataclasses.Field) -> bool:
    return not (f.metadata.get("content_key") == "if_set" and getattr(o, f.name) == f.default)


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (paths, dataclasses and pydantic models included; a `Ref` by its key)."""
    def default(o: Any) -> Any:
        if isinstance(o, Ref):
            return {"ref": o.key}
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return {"type": type(o).__name__, **{f.name: getattr(o, f.name) for f in dataclasses.fields(o) if _keyed(o, f)}}
        if hasattr(o, "model_dump"):
            return o.model_dump(mode="json")
        return str(o)

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=default).encode()).hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_identity(path: str | Path) -> str:
    """Identity of a model folder made elsewhere: its small files' contents, big files' size and mtime."""
    h = hashlib.sha256()
    for p in sorted(Path(path).rglob("*")):
        if not p.is_file():
            continue
        st = p.stat()
        h.update(str(p.relative_to(path)).encode())
        if st.st_size < 1 << 20:
            h.update(p.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
