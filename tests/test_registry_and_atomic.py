import subprocess
import sys
from pathlib import Path

import pytest

from graft.atomic import OutputError, atomic_dir, sweep_leftovers
from tests.conftest import REPO
from graft.registry import Registry


def test_registry_rejects_duplicates_and_lists_known_names():
    reg = Registry("merge method")
    reg.register("ties")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("ties")(lambda: 2)
    with pytest.raises(KeyError, match="known: ties"):
        reg.get("tie")
    assert reg.get("ties")() == 1


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("crash")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_its_own_folder_and_only_when_asked(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        with atomic_dir(final) as tmp:
            (tmp / "b").write_text("2")
    with atomic_dir(final, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["_graftline.json", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not written by graftline"):
        with atomic_dir(mine, overwrite=True):
            pass
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out"]


def test_atomic_dir_never_replaces_an_input_or_the_working_directory(tmp_path, monkeypatch):
    base = tmp_path / "work" / "base"
    base.mkdir(parents=True)
    for target in (tmp_path / "work", base):
        with pytest.raises(OutputError, match="holds an input"):
            with atomic_dir(target, overwrite=True, inputs=[base]):
                pass
    monkeypatch.chdir(tmp_path / "work")
    with pytest.raises(OutputError, match="working directory"):
        with atomic_dir(".", overwrite=True):
            pass
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["base"]


def test_leftovers_of_a_dead_writer_are_swept_and_a_live_ones_kept(tmp_path):
    script = (f"import os, sys\nfrom graft.atomic import atomic_dir\n"
              f"with atomic_dir({str(tmp_path / 'a')!r}) as tmp:\n"
              f"    (tmp / 'half').write_text('x'); print(tmp, flush=True); sys.stdin.readline(); os._exit(9)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
    left = Path(proc.stdout.readline().strip())
    assert left.is_dir() and sweep_leftovers(tmp_path) == []  # its writer is alive: kept
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=60) == 9  # died inside the block, as a kill would
    assert left.is_dir()
    with atomic_dir(tmp_path / "b") as tmp:
        (tmp / "x").write_text("1")
    assert not left.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b"]
