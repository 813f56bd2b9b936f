"""The grafted checkpoint as an MLflow model: registered with versions, weights hard-linked, servable by pyfunc."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import mlflow.pyfunc
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from graft.checkpoint import CheckpointReader
from graft.data import write_jsonl
from graft.evaluation import generate_answers
from graft.fingerprint import base_fingerprint
from graft.lora import read_lora_deltas
from graft.routing import RoutedModel
from graft.skillpack import PackSettings, pack_skill
from graft.testbed.skills import generate
from pipelines.artifacts import Base, Board, Datasets, Packs, Scores, Split
from pipelines.cache import Ref
from pipelines.context import RunContext
from pipelines.logged_model import (
    KEY_TAG,
    MODEL_ID_TAG,
    REGISTERED_TAG,
    WEIGHTS_TAG,
    GraftedModel,
    NotServable,
    local_artifact_folder,
    model_name_problem,
    register_grafted,
)
from pipelines.spec import SpecError, parse_job
from pipelines.stages import graft as graft_stage
from pipelines.tracking import RunHandle, Tracker

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pack(base_model, adapter, tmp_path_factory) -> Path:
    deltas = read_lora_deltas(adapter)
    packed = pack_skill("reverse", deltas, base_fingerprint(CheckpointReader(base_model), list(deltas)), PackSettings())
    return packed.save(tmp_path_factory.mktemp("pack") / "reverse")


def _context(tmp: Path, base: Path, pack: Path, graft: dict, tracking: dict | None = None,
             name: str = "lm") -> tuple[RunContext, list[str]]:
    """The graft stage's inputs on a board, a parent run in a sqlite store under `tmp`, as the driver would set them up;
    and the list its console lines go to."""
    data = tmp / "reverse.jsonl"
    none = tmp / "none.jsonl"
    write_jsonl(data, generate("reverse", "train", 40, 0))
    write_jsonl(none, generate("general", "train", 40, 0))
    job = {"name": name, "output_dir": str(tmp / "runs"), "skills": [{"name": "reverse"}],
           "graft": {"router_none": str(none), "router_examples": 40, **graft}, **({"tracking": tracking} if tracking else {})}
    spec = parse_job(job, "job.yaml")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db", "lm", tmp / "art", job=name)
    parent = RunHandle(tracker.client, tracker.client.create_run(tracker.experiment_id, run_name=name).info.run_id)
    board = Board([Base(Ref(str(base), "base"), Ref(str(base), "base")),
                   Datasets({"reverse": Split(Ref(str(data), "d"), Ref(str(data), "d"))}),
                   Packs({"reverse": Ref(str(pack), "pack")}), Scores({"reverse": Ref(str(tmp / "unused"), "scores")})])
    lines: list[str] = []
    return RunContext(spec, tmp / "job.yaml", tmp / "runs" / name, tracker, parent, frozenset(), board, log=lines.append), lines


def _graft_runs(ctx: RunContext):
    return ctx.tracker.client.search_runs([ctx.tracker.experiment_id], "tags.`graftline.stage` = 'graft'",
                                          order_by=["attributes.start_time ASC"])


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_nlink == 1)


@pytest.fixture(scope="module")
def dense(base_model, pack, tmp_path_factory):
    """An additive graft registered by the graft stage, then the same job run again (reusing the output)."""
    tmp = tmp_path_factory.mktemp("dense")
    first, first_lines = _context(tmp, base_model, pack, {"method": "additive"})
    result = graft_stage.run(first)
    again, again_lines = _context(tmp, base_model, pack, {"method": "additive"})
    reused = graft_stage.run(again)
    return {"tmp": tmp, "first": first, "first_lines": first_lines, "result": result, "again": again,
            "again_lines": again_lines, "reused": reused}


def test_the_grafted_checkpoint_is_a_registered_model_version(dense):
    ctx, out = dense["first"], dense["result"].outputs["grafted"]
    client: MlflowClient = ctx.tracker.client
    version = client.get_model_version("lm-grafted", "1")
    assert version.status == "READY"
    assert version.tags[KEY_TAG] == dense["result"].keys["grafted"]
    logged = client.get_logged_model(version.tags[MODEL_ID_TAG])
    assert logged.status == LoggedModelStatus.READY and logged.tags[KEY_TAG] == version.tags[KEY_TAG]
    assert logged.tags[WEIGHTS_TAG] == "hard-linked"
    assert version.run_id == logged.source_run_id == _graft_runs(ctx)[0].info.run_id
    for run in (_graft_runs(ctx)[0], client.get_run(ctx.parent.run_id)):
        assert run.data.tags[REGISTERED_TAG] == "lm-grafted/1" and run.data.tags[MODEL_ID_TAG] == logged.model_id
    assert "  graft: registered lm-grafted version 1 (models:/lm-grafted/1)" in dense["first_lines"]
    assert (out / "model.safetensors").is_file()


def test_the_weights_are_hard_linked_not_copied(dense):
    ctx, out = dense["first"], dense["result"].outputs["grafted"]
    version = ctx.tracker.client.get_model_version("lm-grafted", "1")
    folder = local_artifact_folder(ctx.tracker.client.get_logged_model(version.tags[MODEL_ID_TAG]).artifact_location)
    assert folder is not None and folder.is_relative_to(dense["tmp"] / "art")
    linked = folder / "model" / "model.safetensors"
    assert not linked.is_symlink() and os.path.samefile(linked, out / "model.safetensors")
    assert _tree_bytes(folder) < 100_000 < (out / "model.safetensors").stat().st_size  # only MLmodel, env and tokenizer files
    assert not (folder / "model" / "_graftline.json").exists()  # graftline's own output marker stays behind


def _load(store: Path, uri: str):
    """`mlflow.pyfunc.load_model(uri)` against the sqlite store in `store` (`models:/` resolves by the process-wide URI)."""
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlflow.db")
    try:
        return mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_registered_model_loads_as_pyfunc_and_generates(dense):
    got = _load(dense["tmp"], "models:/lm-grafted/1").predict(["rev:abc=", "rev:hello="], params={"max_new_tokens": 4})
    out = dense["result"].outputs["grafted"]
    grafted = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True)
    want = generate_answers(grafted, AutoTokenizer.from_pretrained(str(out)), ["rev:abc=", "rev:hello="], 4)
    assert list(got) == want  # the served model is the grafted checkpoint, greedy, completions without the prompt


def test_the_same_content_key_reuses_its_version(dense):
    ctx = dense["again"]
    client = ctx.tracker.client
    assert dense["reused"].cached == 1
    of_key = f"tags.`{KEY_TAG}` = '{dense['result'].keys['grafted']}'"
    assert [str(v.version) for v in client.search_model_versions(f"name = 'lm-grafted' and {of_key}")] == ["1"]
    assert len(client.search_logged_models([ctx.tracker.experiment_id], of_key)) == 1
    assert "  graft: already registered as lm-grafted version 1 (models:/lm-grafted/1)" in dense["again_lines"]
    assert client.get_run(ctx.parent.run_id).data.tags[REGISTERED_TAG] == "lm-grafted/1"


def test_a_different_key_is_a_new_version(dense, base_model, pack):
    ctx = dense["first"]
    grafted = GraftedModel(dense["result"].outputs["grafted"], "another-key", base_model, base_model)
    reg = register_grafted(ctx.tracker.client, ctx.tracker.experiment_id, grafted, "lm-grafted",
                           _graft_runs(ctx)[0].info.run_id, {"method": "additive"}, log=lambda _: None)
    assert (reg.version, reg.reused, reg.uri) == ("2", False, "models:/lm-grafted/2")


def _register_again(dense, base_model, key: str, name: str, lines: list[str]):
    ctx = dense["first"]
    grafted = GraftedModel(dense["result"].outputs["grafted"], key, base_model, base_model)
    reg = register_grafted(ctx.tracker.client, ctx.tracker.experiment_id, grafted, name, _graft_runs(ctx)[0].info.run_id,
                           {"method": "additive"}, log=lines.append)
    logged = ctx.tracker.client.get_logged_model(reg.model_id)
    return reg, logged, local_artifact_folder(logged.artifact_location)


def test_where_hard_links_fail_the_files_are_copied_and_it_says_so(dense, base_model, monkeypatch):
    def cross_device(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "link", cross_device)
    lines: list[str] = []
    reg, logged, folder = _register_again(dense, base_model, "copied-key", "lm-copied", lines)
    assert logged.tags[WEIGHTS_TAG].startswith("copied") and any("copying the model" in line for line in lines)
    out = dense["result"].outputs["grafted"]
    assert not os.path.samefile(folder / "model" / "model.safetensors", out / "model.safetensors")
    assert (folder / "model" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_remote_store_gets_the_files_uploaded(dense, base_model, monkeypatch):
    monkeypatch.setattr("pipelines.logged_model.local_artifact_folder", lambda uri: None)  # as for s3:// or mlflow-artifacts:/
    lines: list[str] = []
    reg, logged, _ = _register_again(dense, base_model, "remote-key", "lm-remote", lines)
    assert logged.tags[WEIGHTS_TAG] == "uploaded" and any("is remote: uploading" in line for line in lines)
    monkeypatch.undo()
    folder = local_artifact_folder(logged.artifact_location)
    assert (folder / "model" / "model.safetensors").is_file() and (folder / "components" / "tokenizer" / "tokenizer.json").is_file()
    got = _load(dense["tmp"], reg.uri).predict(["rev:abc="], params={"max_new_tokens": 4})
    assert len(got) == 1


def test_a_model_mlflow_would_run_as_remote_code_is_not_registered(dense, base_model, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(dense["result"].outputs["grafted"], custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "architectures": ["MyOwnForCausalLM"]}))
    ctx = dense["first"]
    before = len(ctx.tracker.client.search_logged_models([ctx.tracker.experiment_id]))
    with pytest.raises(NotServable, match="MyOwnForCausalLM.* is not a class of transformers"):
        register_grafted(ctx.tracker.client, ctx.tracker.experiment_id, GraftedModel(custom, "custom-key", base_model, base_model),
                         "lm-custom", _graft_runs(ctx)[0].info.run_id, {}, log=lambda _: None)
    assert len(ctx.tracker.client.search_logged_models([ctx.tracker.experiment_id])) == before  # nothing half-made


def test_register_model_false_registers_nothing(base_model, pack, tmp_path):
    ctx, _ = _context(tmp_path, base_model, pack, {"method": "additive"}, tracking={"register_model": False})
    graft_stage.run(ctx)
    client = ctx.tracker.client
    assert client.search_registered_models() == [] and client.search_logged_models([ctx.tracker.experiment_id]) == []
    assert REGISTERED_TAG not in client.get_run(ctx.parent.run_id).data.tags


def test_model_name_is_validated():
    with pytest.raises(SpecError, match="tracking.model_name: .*not a model name"):
        parse_job({"name": "x", "skills": [{"name": "reverse"}], "tracking": {"model_name": "a/b"}}, "job.yaml")
    assert model_name_problem("my-model.v2") is None and model_name_problem("-x") is not None


def test_a_routed_graft_is_served_from_code(base_model, pack, tmp_path):
    ctx, lines = _context(tmp_path, base_model, pack, {"method": "routed"}, tracking={"model_name": "routed-lm"})
    result = graft_stage.run(ctx)
    assert result.warnings == [] and "  graft: registered routed-lm version 1 (models:/routed-lm/1)" in lines
    client = ctx.tracker.client
    (version,) = client.search_model_versions("name = 'routed-lm'")
    folder = local_artifact_folder(client.get_logged_model(version.tags[MODEL_ID_TAG]).artifact_location)
    mlmodel = yaml.safe_load((folder / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("python_model*"))  # nothing pickled
    assert os.path.samefile(folder / "artifacts" / "base" / "model.safetensors", base_model / "model.safetensors")
    assert os.path.samefile(folder / "artifacts" / "routed" / "router.safetensors", result.outputs["grafted"] / "router.safetensors")
    prompts = ["rev:abc=", "rev:hello=", "hello"]
    got = _load(tmp_path, "models:/routed-lm/1").predict(prompts, params={"max_new_tokens": 3})
    routed = RoutedModel.load(result.outputs["grafted"])
    assert got == generate_answers(routed, AutoTokenizer.from_pretrained(str(base_model)), prompts, 3)


def test_local_and_remote_artifact_locations():
    assert local_artifact_folder("file:///srv/art/1/models/m-1/artifacts") == Path("/srv/art/1/models/m-1/artifacts")
    assert local_artifact_folder("/srv/art/x") == Path("/srv/art/x")
    assert local_artifact_folder("mlflow-artifacts:/1/models/m-1/artifacts") is None
    assert local_artifact_folder("s3://bucket/1/models/m-1/artifacts") is None
