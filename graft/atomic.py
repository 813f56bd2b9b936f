"""Output folders: written whole or not at all, and never in place of something graftline did not write.

- A folder is written under a temporary name beside its target (`.tmp-<name>-<id>`) and renamed into
  place only once complete, with an output marker (`_graftline.json`) inside: a crash, a kill or an
  exception never leaves a half-written checkpoint that looks whole.
- An existing target is refused unless the caller asks to overwrite, and even then only a folder
  that carries graftline's marker is replaced. A folder that is, holds or lies above one of the
  command's own inputs, or the working directory, is never replaced.
- Each temporary folder has a lock file beside it, held (`flock`) for as long as its writer lives.
  The kernel drops the lock when the writer dies, however it dies, so the next writer into the same
  parent folder removes leftovers whose lock is free, and only those.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

MARKER = "_graftline.json"
TMP_PREFIX, OLD_PREFIX, LOCK_SUFFIX = ".tmp-", ".old-", ".lock"
log = logging.getLogger("graftline")


class OutputError(ValueError):
    """An output path graftline refuses to write; the message names the path and why."""


class OutputMarker(BaseModel):
    """`_graftline.json`: what wrote a folder. Stage outputs add their stage, item, content key and metrics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["graftline.output"] = "graftline.output"
    version: Literal[1] = 1
    kind: str = "output"
    stage: str | None = None
    item: str | None = None
    key: str | None = None
    metrics: dict[str, float] = {}


def read_marker(folder: str | os.PathLike) -> OutputMarker | None:
    """The folder's output marker, or None when it has none or one graftline did not write."""
    path = Path(folder) / MARKER
    try:
        return OutputMarker.model_validate_json(path.read_bytes())
    except (OSError, ValidationError, ValueError):
        return None


def write_marker(folder: str | os.PathLike, marker: OutputMarker) -> None:
    (Path(folder) / MARKER).write_text(marker.model_dump_json(indent=1))


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """The resolved target folder, or OutputError when writing there could destroy something.

    Refused: an existing target without `overwrite`; with it, a target that is not a folder with
    graftline's marker; always, a target that is or contains an input or the working directory.
    """
    if Path(target).expanduser().is_symlink():
        raise OutputError(f"{target}: is a symbolic link; graftline never writes through one; choose a new folder")
    final = Path(target).expanduser().resolve()
    if _within(Path.cwd().resolve(), final):
        raise OutputError(f"{target}: is the working directory or above it; choose a new folder")
    for item in inputs:
        path = Path(item).expanduser().resolve()
        if _within(path, final):
            raise OutputError(f"{target}: holds an input of this command ({item}); choose a new folder")
    if final.is_symlink() or final.exists():
        if final.is_symlink() or not final.is_dir():
            raise OutputError(f"{target}: exists and is not a folder graftline wrote; choose a new folder")
        if not overwrite:
            raise OutputError(f"{target}: already exists; pass --overwrite to replace a folder graftline wrote")
        if read_marker(final) is None:
            raise OutputError(f"{target}: exists and was not written by graftline (no {MARKER}); it is never replaced")
    return final


def sweep_leftovers(parent: Path) -> list[Path]:
    """Remove temporary folders in `parent` whose writer is gone (their lock is free); returns them."""
    removed = []
    if not parent.is_dir():
        return removed
    for lock_path in sorted(parent.glob(f"{TMP_PREFIX}*{LOCK_SUFFIX}")):
        ident = lock_path.name[len(TMP_PREFIX):-len(LOCK_SUFFIX)]
        try:
            fd = os.open(lock_path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # a live writer holds it
            continue
        try:
            for prefix in (TMP_PREFIX, OLD_PREFIX):
                left = parent / f"{prefix}{ident}"
                if left.is_dir():
                    shutil.rmtree(left, ignore_errors=True)
                    removed.append(left)
                    log.info("removed %s, left by a writer that is gone", left)
            lock_path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return removed


class _Lease:
    """The held lock of one temporary folder: `.tmp-<ident>.lock` beside it, flock'ed until released."""

    def __init__(self, parent: Path, ident: str) -> None:
        self.path = parent / f"{TMP_PREFIX}{ident}{LOCK_SUFFIX}"
        staging = parent / f".lock-{ident}"
        self.fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.write(self.fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        os.rename(staging, self.path)  # appears under its swept name only once locked

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


@contextmanager
def atomic_dir(target: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[str | os.PathLike] = (),
               kind: str = "output", marker: OutputMarker | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `target`; on success it becomes `target`, marked as graftline's.

    `target` is checked first (`check_output`); `inputs` are the folders and files the command reads.
    On an exception the temporary folder is removed and `target` is left as it was. A marker the
    block wrote itself (stage outputs write theirs) is kept; otherwise `marker`, or a plain one of `kind`.
    """
    final = check_output(target, overwrite=overwrite, inputs=inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(final.parent)
    ident = f"{final.name}-{uuid.uuid4().hex[:8]}"
    lease = _Lease(final.parent, ident)
    tmp = final.parent / f"{TMP_PREFIX}{ident}"
    try:
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if read_marker(tmp) is None:
            write_marker(tmp, marker or OutputMarker(kind=kind))
        if final.exists():
            check_output(final, overwrite=True, inputs=inputs)  # still ours, just before it goes
            old = final.parent / f"{OLD_PREFIX}{ident}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    finally:
        lease.release()


@contextmanager
def scratch_dir(parent: str | os.PathLike, name: str = "scratch") -> Iterator[Path]:
    """A temporary folder in `parent` for work that leaves nothing behind (e.g. Ray Train's checkpoint storage).

    Removed when the block ends, however it ends; if its process dies instead, the next writer into
    `parent` removes it (its lock is free), as it does a leftover of `atomic_dir`.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(parent)
    ident = f"{name}-{uuid.uuid4().hex[:8]}"
    lease = _Lease(parent, ident)
    tmp = parent / f"{TMP_PREFIX}{ident}"
    try:
        tmp.mkdir()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        lease.release()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file via a temporary name and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    os.replace(tmp, path)
