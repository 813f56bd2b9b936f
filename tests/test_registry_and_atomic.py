import pytest

from graft.atomic import atomic_dir
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


def test_atomic_dir_replaces_complete_folder(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(final) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
