"""Signed SkillPacks: the library round trip, and a job that signs its packs and grafts only signed ones."""

from __future__ import annotations

import json

import pytest
import yaml

from graft.checkpoint import CheckpointReader
from graft.data import write_jsonl
from graft.fingerprint import base_fingerprint
from graft.importance import SCORES, save_scores
from graft.lora import load_with_adapter, read_lora_deltas
from graft.signing import SIGNATURE, SignatureError, generate_keypair, verify_folder
from graft.skillpack import PackSettings, SkillPack, pack_skill
from graft.testbed.skills import generate
from pipelines.artifacts import Experts, Base, Board, Datasets, Scores, Split
from pipelines.cache import Ref
from pipelines.context import RunContext
from pipelines.spec import parse_job
from pipelines.runtime import ray_session
from pipelines.stages import graft as graft_stage
from pipelines.stages import pack as pack_stage
from pipelines.tracking import Tracker


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "me.key", d / "me.pub")
    generate_keypair(d / "other.key", d / "other.pub")
    return d


def test_sign_verify_and_every_way_to_break_it(base_model, adapter, keys, tmp_path):
    d = read_lora_deltas(adapter)
    pack = pack_skill("rev", d, base_fingerprint(CheckpointReader(base_model), list(d)), PackSettings())
    folder = pack.save(tmp_path / "pack", sign_with=keys / "me.key")
    assert (folder / SIGNATURE).is_file()
    verify_folder(folder, keys / "me.pub")
    SkillPack.load(folder)  # the signature is not a payload file
    with pytest.raises(SignatureError, match="does not verify with .*other.pub"):
        verify_folder(folder, keys / "other.pub")
    (folder / "extra.txt").write_text("x")
    with pytest.raises(SignatureError, match="does not verify"):
        verify_folder(folder, keys / "me.pub")
    with pytest.raises(SignatureError, match="not signed"):
        verify_folder(pack.save(tmp_path / "unsigned"), keys / "me.pub")
    with pytest.raises(SignatureError, match="already exists; keys are never overwritten"):
        generate_keypair(keys / "me.key", tmp_path / "new.pub")
    assert oct((keys / "me.key").stat().st_mode & 0o777) == "0o600"


def _context(tmp_path, base, adapter, graft: dict, pack: dict) -> RunContext:
    text = yaml.safe_dump({"name": "signed", "output_dir": str(tmp_path / "runs"), "skills": [{"name": "reverse"}],
                           "pack": pack, "graft": graft})
    spec = parse_job(yaml.safe_load(text), "job.yaml")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "signed", tmp_path / "art", job="signed")
    parent = tracker.run("signed").__enter__()
    data = tmp_path / "reverse.jsonl"
    write_jsonl(data, generate("reverse", "train", 16, 0))
    scores = tmp_path / "scores"
    scores.mkdir(exist_ok=True)
    model = load_with_adapter(base, adapter)
    save_scores(SCORES.get("magnitude")(model, []).finalize(), scores / "scores.safetensors", "magnitude", 1)
    board = Board([Base(Ref(str(base), "base"), Ref(str(base), "base")),
                   Datasets({"reverse": Split(Ref(str(data), "d"), Ref(str(data), "d"))}),
                   Experts({"reverse": Ref(str(adapter), "adapter")}), Scores({"reverse": Ref(str(scores), "scores")})])
    return RunContext(spec, tmp_path / "job.yaml", tmp_path / "runs" / "signed", tracker, parent, frozenset(), board, log=lambda m: None)


def test_a_job_signs_its_packs_and_grafts_only_signed_ones(base_model, adapter, keys, tmp_path):
    ctx = _context(tmp_path, base_model, adapter, graft={"require_signature": str(keys / "me.pub"), "method": "protected"},
                   pack={"sign_key": str(keys / "me.key")})
    with ray_session(None, num_cpus=1):  # the pack stage packs each skill as a Ray task
        packed = pack_stage.run(ctx)
    ctx.board.put(*packed.artifacts)
    verify_folder(packed.outputs["reverse"], keys / "me.pub")
    grafted = graft_stage.run(ctx)  # protected fusion: the score stage's maps reach it through the Scores artifact
    assert (grafted.outputs["grafted"] / "graftline_grafts.json").is_file()

    strict = _context(tmp_path, base_model, adapter, graft={"require_signature": str(keys / "other.pub")},
                      pack={"sign_key": str(keys / "me.key")})
    strict.board.put(*pack_stage.run(strict).artifacts)  # the same pack: reused, no Ray task needed
    with pytest.raises(SignatureError, match="does not verify with .*other.pub"):
        graft_stage.run(strict)
    runs = strict.tracker.client.search_runs([strict.tracker.experiment_id], "tags.`graftline.stage` = 'graft'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert json.loads((packed.outputs["reverse"] / "skillpack.json").read_text())["skill"] == "reverse"
