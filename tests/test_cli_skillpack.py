import json
import subprocess

import torch

from graft.checkpoint import CheckpointReader
from graft.lora import read_lora_deltas
from tests.conftest import make_base, run_cli


def graft_cli(*args: object) -> subprocess.CompletedProcess:
    return run_cli(*args)


def test_pack_inspect_apply_remove_roundtrip(base_model, adapter, tmp_path):
    pack = tmp_path / "pack"
    assert graft_cli("pack", adapter, "--base", base_model, "--out", pack, "--skill", "rev").returncode == 0
    shown = graft_cli("inspect", pack)
    assert shown.returncode == 0
    for key in read_lora_deltas(adapter):
        assert key in shown.stdout
    assert "svd_quant" in shown.stdout and "of the bf16 delta" in shown.stdout

    assert graft_cli("apply", base_model, pack, "--out", tmp_path / "grafted").returncode == 0
    assert graft_cli("remove", tmp_path / "grafted", pack, "--out", tmp_path / "back").returncode == 0
    base, back, grafted = (CheckpointReader(p) for p in (base_model, tmp_path / "back", tmp_path / "grafted"))
    key = next(iter(read_lora_deltas(adapter)))
    assert not torch.allclose(grafted.get(key), base.get(key))
    torch.testing.assert_close(back.get(key), base.get(key), atol=1e-5, rtol=0)


def test_apply_to_drifted_base_refused_then_allowed(base_model, adapter, tmp_path):
    pack = tmp_path / "pack"
    graft_cli("pack", adapter, "--base", base_model, "--out", pack)
    v2 = make_base(tmp_path / "v2", seed=3)
    refused = graft_cli("apply", v2, pack, "--out", tmp_path / "out")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "--allow-base-drift" in refused.stderr and str(pack) in refused.stderr
    assert not (tmp_path / "out").exists()
    allowed = graft_cli("apply", v2, pack, "--out", tmp_path / "out", "--allow-base-drift")
    assert allowed.returncode == 0 and "base drift" in allowed.stderr


def test_inspect_refuses_tampered_pack(base_model, adapter, tmp_path):
    pack = tmp_path / "pack"
    graft_cli("pack", adapter, "--base", base_model, "--out", pack)
    data = bytearray((pack / "pack.safetensors").read_bytes())
    data[-3] ^= 0x55
    (pack / "pack.safetensors").write_bytes(bytes(data))
    proc = graft_cli("inspect", pack)
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr


def test_pack_refuses_pickle_adapter(base_model, tmp_path):
    bad = tmp_path / "adapter"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": 8}')
    (bad / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    proc = graft_cli("pack", bad, "--base", base_model, "--out", tmp_path / "pack")
    assert proc.returncode == 2 and "adapter_model.bin: pickle checkpoints are refused" in proc.stderr
    assert not (tmp_path / "pack").exists()


def test_pack_to_a_budget_with_gptq_calibration(base_model, adapter, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(f'{{"prompt": "rev {w} =", "answer": " {w[::-1]}"}}\n' for w in ("abc", "hello", "graft", "xyz")))
    pack = tmp_path / "pack"
    refused = graft_cli("pack", adapter, "--base", base_model, "--out", pack, "--quantizer", "gptq")
    assert refused.returncode == 2 and "--calibration-data" in refused.stderr and not pack.exists()
    done = graft_cli("pack", adapter, "--base", base_model, "--out", pack, "--quantizer", "gptq", "--bits", "3",
                     "--band-fractions", "1", "--budget", "0.1", "--calibration-data", data, "--tune-steps", "2")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((pack / "skillpack.json").read_text())
    assert manifest["total_bytes"] <= 0.1 * manifest["delta_bf16_bytes"]
    assert {e["quantizer"] for e in manifest["tensors"].values()} == {"gptq"}
    assert manifest["grid_tuning"]["steps"] == 2 and manifest["grid_tuning"]["matrices"] == len(manifest["tensors"])
    shown = graft_cli("inspect", pack).stdout
    assert shown.count("gptq") == len(manifest["tensors"]) and "rounding" in shown and "grids tuned to the expert" in shown


def test_route_builds_a_routed_model_that_loads_and_refuses_missing_classes(base_model, adapter, tmp_path):
    from graft.routing import RoutedModel

    pack = tmp_path / "pack"
    assert graft_cli("pack", adapter, "--base", base_model, "--out", pack, "--skill", "rev").returncode == 0
    rev, other = tmp_path / "rev.jsonl", tmp_path / "general.jsonl"
    words = ("abc", "hello", "graft", "xyz", "moon", "tree")
    rev.write_text("".join(f'{{"prompt": "rev {w} =", "answer": " {w[::-1]}"}}\n' for w in words))
    other.write_text("".join(f'{{"prompt": "{w} is a word.", "answer": " yes"}}\n' for w in ("cat", "dog", "sun", "sea", "sky", "hat")))
    out = tmp_path / "routed"
    refused = graft_cli("route", base_model, pack, "--out", out, "--prompts", f"rev={rev}")
    assert refused.returncode == 2 and "'none'" in refused.stderr and refused.stderr.count("\n") == 1 and not out.exists()
    done = graft_cli("route", base_model, pack, "--out", out, "--prompts", f"rev={rev}", f"none={other}", "--examples", "6")
    assert done.returncode == 0, done.stderr
    assert "held-out 'rev' prompts" in done.stdout
    routed = RoutedModel.load(out)
    assert [p.name for p in routed.packs] == ["rev"] and routed.router.classes == ["rev", "none"]


def test_score_then_pack_with_importance_allocation(base_model, adapter, tmp_path):
    from graft.importance import load_scores

    data = tmp_path / "train.jsonl"
    data.write_text("".join(f'{{"prompt": "rev {w} =", "answer": " {w[::-1]}"}}\n' for w in ("abc", "hello", "graft", "xyz")))
    scored = graft_cli("score", adapter, "--base", base_model, "--data", data, "--out", tmp_path / "scores")
    assert scored.returncode == 0, scored.stderr
    scores = load_scores(tmp_path / "scores" / "scores.safetensors")
    deltas = read_lora_deltas(adapter)
    assert set(deltas) <= set(scores) and all(float(scores[k].sum()) > 0 for k in deltas)
    without = graft_cli("pack", adapter, "--base", base_model, "--out", tmp_path / "p0", "--budget", "0.1", "--allocation", "importance")
    assert without.returncode == 2 and "importance" in without.stderr and not (tmp_path / "p0").exists()
    packed = graft_cli("pack", adapter, "--base", base_model, "--out", tmp_path / "p1", "--budget", "0.1", "--allocation",
                       "energy_importance", "--importance", tmp_path / "scores" / "scores.safetensors")
    assert packed.returncode == 0, packed.stderr
    assert json.loads((tmp_path / "p1" / "skillpack.json").read_text())["settings"]["allocation"] == "energy_importance"
