"""Stale locks of torch's JIT extension builds, found and cleared before DeepSpeed loads its ops.

DeepSpeed JIT-builds C++ ops through `torch.utils.cpp_extension.load` (on a CPU machine the
`deepspeed_shm_comm` op, at every `deepspeed.initialize`; `cpu_adam` with optimizer offload). torch
serialises builders with `<build dir>/lock`, created with O_EXCL and held open until the build (or the
up-to-date check) ends, and every other process waits for the file to go away, forever. A process
killed while holding it (a SIGKILLed worker, a Ctrl-C during the first build) leaves the file behind
and every later DeepSpeed run on that machine hangs. A lock is stale when no live process holds it
open; before it is removed, whatever its builder left compiling in the build folder is waited for.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PROC = Path("/proc")
CHECK_FILE = ".graftline-lock-check"  # serialises the workers of one node that clear the same cache


def extension_locks(root: Path) -> list[Path]:
    """Build locks under a torch extensions root: `<root>/<op>/lock` or `<root>/<py>_<accel>/<op>/lock`."""
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def busy_paths(proc: Path = PROC) -> tuple[set[str], dict[int, str]]:
    """(real paths of files live processes hold open, each live process's working directory by pid)."""
    open_files: set[str] = set()
    cwds: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwds[int(entry.name)] = os.readlink(entry / "cwd")
            for fd in (entry / "fd").iterdir():
                open_files.add(os.readlink(fd))
        except OSError:  # the process ended meanwhile, or belongs to another user (not a builder in our cache)
            continue
    return open_files, cwds


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def is_stale(lock: Path, open_files: set[str]) -> bool:
    """Whether `lock` exists and no live process holds it open (torch's builder holds it until it is done)."""
    return lock.exists() and os.path.realpath(lock) not in open_files


def _wait_for_orphans(folder: Path, proc: Path, log: Callable[[str], None], timeout_s: float, poll_s: float) -> None:
    """Wait until no process works inside `folder`: a killed builder's ninja and compiler run on to the end."""
    real = os.path.realpath(folder)
    deadline, told = time.monotonic() + timeout_s, False
    while True:
        pids = sorted(pid for pid, cwd in busy_paths(proc)[1].items() if _within(cwd, real) and pid != os.getpid())
        if not pids:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{folder}: processes {pids} still build there {timeout_s:.0f} s after their owner died; "
                               f"stop them, or remove {folder / 'lock'}")
        if not told:
            log(f"waiting for processes {pids}, left building in {folder} by a builder that is gone")
            told = True
        time.sleep(poll_s)


def clear_stale_locks(roots: Iterable[Path], log: Callable[[str], None] = print, proc: Path = PROC,
                      orphan_timeout_s: float = 600.0, poll_s: float = 1.0) -> list[Path]:
    """Remove every stale build lock under `roots`, one line each; returns the locks removed.

    A lock nobody holds is stale. Its builder's orphaned ninja and compiler may still run in the build
    folder; they are waited for (up to `orphan_timeout_s`), so the next build does not race them.
    Clearers on one node take turns (flock on a file in the root), and a lock nobody holds cannot be
    taken by anyone (torch creates it with O_EXCL), so a lock is never removed from under a live builder.
    """
    cleared: list[Path] = []
    for root in roots:
        if not extension_locks(root):
            continue
        if not proc.is_dir():
            log(f"cannot tell whether the torch extension locks under {root} are stale without {proc}; left as they are")
            continue
        with open(root / CHECK_FILE, "a") as turn:
            fcntl.flock(turn, fcntl.LOCK_EX)
            try:
                for lock in extension_locks(root):
                    if is_stale(lock, busy_paths(proc)[0]):
                        _wait_for_orphans(lock.parent, proc, log, orphan_timeout_s, poll_s)
                        lock.unlink(missing_ok=True)
                        cleared.append(lock)
                        log(f"removed stale torch extension lock {lock} (its builder is gone; DeepSpeed would wait on it forever)")
            finally:
                fcntl.flock(turn, fcntl.LOCK_UN)
    return cleared


def extension_roots(env_dir: str | None) -> list[Path]:
    """Where torch builds JIT extensions: its per-user cache, and `env_dir` (TORCH_EXTENSIONS_DIR) when set."""
    from torch.utils.cpp_extension import get_default_build_root

    roots = [Path(get_default_build_root())]
    if env_dir:
        roots.append(Path(env_dir))
    return [r for r in roots if r.is_dir()]


def prebuild_cpu_ops() -> None:
    """Build the op DeepSpeed's CPU accelerator loads at every start (set-up time, so runs never compile).

    A no-op on a machine whose DeepSpeed accelerator is not the CPU. Stale locks are cleared first.
    """
    clear_stale_locks(extension_roots(os.environ.get("TORCH_EXTENSIONS_DIR")))
    from deepspeed.accelerator import get_accelerator
    from deepspeed.comm.torch import build_shm_op

    if get_accelerator().device_name() == "cpu":
        build_shm_op()


if __name__ == "__main__":
    prebuild_cpu_ops()
