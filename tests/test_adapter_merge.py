import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from graft.adapter_merge import merge_adapters
from graft.checkpoint import CheckpointReader
from graft.lora import read_lora_deltas
from tests.conftest import make_adapter, run_cli


@pytest.fixture(scope="module")
def two_adapters(base_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(base_model, root / "a", seed=1), make_adapter(base_model, root / "b", seed=2, targets=("q_proj", "o_proj"))]


def test_linear_sum_at_full_rank_is_exact_and_loads_with_peft(base_model, two_adapters, tmp_path):
    merge_adapters(two_adapters, tmp_path / "m", method="task_arithmetic", weights=[1.0, 0.5], rank=8)
    d1, d2 = (read_lora_deltas(a) for a in two_adapters)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_model)), str(tmp_path / "m")).merge_and_unload()
    state, base = model.state_dict(), CheckpointReader(base_model)
    for key in set(d1) | set(d2):
        want = base.get(key) + (d1[key].dense() if key in d1 else 0) + 0.5 * (d2[key].dense() if key in d2 else 0)
        torch.testing.assert_close(state[key], want, atol=1e-5, rtol=1e-4)


def test_ties_to_lower_rank_writes_that_rank(two_adapters, tmp_path):
    report = merge_adapters(two_adapters, tmp_path / "m", method="ties", density=0.5, rank=2)
    merged = read_lora_deltas(tmp_path / "m")
    assert report["rank"] == 2 and all(d.A.shape[0] == 2 for d in merged.values())
    assert len(merged) == report["tensors"] == 2 * 4  # q, v, down from one adapter, q, o from the other; 2 layers


def test_bad_requests_are_refused_and_write_nothing(two_adapters, tmp_path):
    with pytest.raises(ValueError, match="at least two"):
        merge_adapters(two_adapters[:1], tmp_path / "m")
    with pytest.raises(ValueError, match="no parameter 'lamda'"):
        merge_adapters(two_adapters, tmp_path / "m", method="ties", lamda=0.5)
    with pytest.raises(KeyError, match="unknown merge method"):
        merge_adapters(two_adapters, tmp_path / "m", method="tie")
    assert not (tmp_path / "m").exists()


def test_cli_merge_adapters(two_adapters, tmp_path):
    ok = run_cli("merge-adapters", *two_adapters, "--out", tmp_path / "m", "--method", "dare_ties", "--density", "0.7", "--rank", "4")
    assert ok.returncode == 0, ok.stderr
    assert all(d.A.shape[0] == 4 for d in read_lora_deltas(tmp_path / "m").values())
    bad = run_cli("merge-adapters", two_adapters[0], "--out", tmp_path / "x")
    assert bad.returncode == 2 and bad.stderr.startswith("graft: error: merging needs at least two")
