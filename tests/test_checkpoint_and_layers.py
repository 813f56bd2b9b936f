import ast

import pytest
import torch
from transformers import AutoModelForCausalLM

from graft.checkpoint import CheckpointReader, write_checkpoint
from pipelines.tracking import Tracker
from tests.conftest import REPO


def test_sharded_write_roundtrips_and_loads_with_transformers(base_model, tmp_path):
    reader = CheckpointReader(base_model)
    out = write_checkpoint(tmp_path / "sharded", reader.items(), side_files_from=base_model, max_shard_bytes=64 * 1024)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    back = CheckpointReader(out)
    assert back.keys() == reader.keys()
    for k in reader.keys():
        assert torch.equal(back.get(k), reader.get(k))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.model_type == "llama"


def test_failed_write_leaves_no_folder(base_model, tmp_path):
    def broken():
        yield from list(CheckpointReader(base_model).items())[:2]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_checkpoint(tmp_path / "out", broken(), side_files_from=base_model)
    assert list(tmp_path.iterdir()) == []


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module.split(".")[0]


def test_graft_library_never_imports_orchestration():
    for path in (REPO / "graft").rglob("*.py"):
        bad = {"ray", "mlflow", "pipelines", "deepspeed"} & set(_imports(path))
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_failed_run_is_marked_failed_with_error(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "t", tmp_path / "art")
    with pytest.raises(ValueError):
        with tracker.run("parent") as parent:
            with tracker.run("child", parent=parent):
                raise ValueError("tensor 'x' holds NaN")
    runs = {r.info.run_name: r for r in tracker.client.search_runs([tracker.experiment_id])}
    assert runs["child"].info.status == runs["parent"].info.status == "FAILED"
    assert runs["child"].data.tags["graftline.error"] == "ValueError: tensor 'x' holds NaN"
    assert runs["child"].data.tags["mlflow.parentRunId"] == runs["parent"].info.run_id
