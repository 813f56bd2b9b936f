import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.data import collate, encode_examples
from graft.importance import SCORES, ImportancePartial, load_scores, module_summary, save_scores
from graft.testbed.skills import generate


@pytest.fixture(scope="module")
def model_and_batches(base_model):
    tok = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model))
    enc = encode_examples(tok, generate("reverse", "train", 6, 0), 32)
    return model, [collate([e], tok.pad_token_id) for e in enc]


@pytest.mark.parametrize("method", ["fisher", "snip"])
def test_shard_partials_combine_exactly(model_and_batches, method):
    model, batches = model_and_batches
    whole = SCORES.get(method)(model, batches)
    parts = SCORES.get(method)(model, batches[:2]) + SCORES.get(method)(model, batches[2:])
    assert whole.count == parts.count == 6
    for k in whole.sums:
        torch.testing.assert_close(whole.sums[k], parts.sums[k], rtol=1e-5, atol=1e-9)


def test_fisher_is_mean_squared_gradient(model_and_batches):
    model, batches = model_and_batches
    fisher = SCORES.get("fisher")(model, batches).finalize()
    assert all(p.grad is None for p in model.parameters())
    key = "model.layers.0.mlp.down_proj.weight"
    grads = []
    for b in batches:
        model.zero_grad()
        model(**b).loss.backward()
        grads.append(dict(model.named_parameters())[key].grad.clone())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(fisher[key], torch.stack(grads).pow(2).mean(0), rtol=1e-5, atol=1e-10)


def test_scoring_restores_frozen_parameters(model_and_batches):
    model, batches = model_and_batches
    for p in model.parameters():
        p.requires_grad_(False)
    scores = SCORES.get("fisher")(model, batches[:1]).finalize()
    assert all(not p.requires_grad for p in model.parameters())
    assert any(v.sum() > 0 for v in scores.values())
    for p in model.parameters():
        p.requires_grad_(True)


def test_magnitude_and_roundtrip(model_and_batches, tmp_path):
    model, _ = model_and_batches
    scores = SCORES.get("magnitude")(model, []).finalize()
    save_scores(scores, tmp_path / "s.safetensors", "magnitude", 1)
    back = load_scores(tmp_path / "s.safetensors")
    assert back.keys() == scores.keys()
    summary = module_summary(back)
    assert abs(sum(r["share"] for r in summary.values()) - 1) < 1e-6


def test_combining_mismatched_partials_fails():
    with pytest.raises(ValueError):
        ImportancePartial({"a": torch.ones(1)}, 1) + ImportancePartial({"b": torch.ones(1)}, 1)


@pytest.mark.parametrize("method", ["fisher", "snip", "magnitude"])
def test_only_the_named_tensors_are_scored_and_their_scores_do_not_change(model_and_batches, method):
    model, batches = model_and_batches
    keys = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    whole = SCORES.get(method)(model, batches).finalize()
    seen: list[set[str]] = []
    handles = [p.register_hook(lambda g, n=n: seen[-1].add(n)) for n, p in model.named_parameters()]
    seen.append(set())
    try:
        some = SCORES.get(method)(model, batches, keys).finalize()
    finally:
        for h in handles:
            h.remove()
    assert list(some) == keys
    for k in keys:
        torch.testing.assert_close(some[k], whole[k], rtol=1e-5, atol=1e-10)
    if method != "magnitude":
        assert seen[-1] == set(keys)  # no gradient is taken, or held, for the tensors not scored
    assert all(p.requires_grad for p in model.parameters())  # as they were before


def test_a_tensor_the_model_lacks_is_refused_by_name(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ValueError, match="model.layers.9.mlp.up_proj.weight"):
        SCORES.get("fisher")(model, batches[:1], ["model.layers.9.mlp.up_proj.weight"])
