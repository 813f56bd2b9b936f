"""Content keys for stage outputs: the same inputs and spec give the same key, so a rerun skips.

A stage's output folder is `<run root>/<stage>/<item>-<key>`; it is written under a temporary
name and renamed when complete, so an existing folder is a complete one.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MARKER = "_graftline.json"


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (paths and pydantic models included)."""
    def default(o: Any) -> Any:
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


def read_marker(folder: Path) -> dict:
    path = folder / MARKER
    return json.loads(path.read_text()) if path.is_file() else {}


def write_marker(folder: Path, info: dict) -> None:
    (folder / MARKER).write_text(json.dumps(info, indent=1, default=str))
