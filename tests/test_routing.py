"""Routed fusion: per-input deltas equal the dense graft of the routed pack, routing is learnt, saved and reloaded."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import graft.routing as routing
from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.grafting import graft
from graft.lora import LowRankDelta
from graft.routing import NONE, RoutedModel, Router, build_routed, pooled_features, train_router
from graft.skillpack import PackSettings, SkillPackError, pack_skill
from graft.testbed.skills import generate
from tests.conftest import make_base

torch.set_num_threads(1)
SETTINGS = PackSettings(energy=1.0, bits=(8, 4), band_fractions=(0.5, 0.5), keep_fraction=0.1)
SKILLS = ("reverse", "add")


def random_pack(base, skill, seed):
    """A pack touching every kind of tensor: low-rank linears, pruned embedding and head, dense norms."""
    reader = CheckpointReader(base)
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for key in reader.keys():
        shape = reader.shape(key)
        if key.endswith("proj.weight"):
            deltas[key] = LowRankDelta(key, torch.randn(4, shape[1], generator=g), torch.randn(shape[0], 4, generator=g) * 0.05, 1.0)
        elif "embed_tokens" in key or "lm_head" in key or "norm" in key:
            deltas[key] = torch.randn(shape, generator=g) * 0.3
    return pack_skill(skill, deltas, base_fingerprint(reader, list(deltas)), SETTINGS)


@pytest.fixture(scope="module")
def setup(base_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("routing")
    packs = [random_pack(base_model, s, i + 1) for i, s in enumerate(SKILLS)]
    grafted = {NONE: base_model}
    for pack in packs:
        grafted[pack.name] = graft(base_model, [pack], tmp / pack.name)["out"]
    tok = AutoTokenizer.from_pretrained(str(base_model))
    tok.padding_side = "left"
    prompts = {"reverse": "reverse", "add": "add", NONE: "general"}
    train = {c: [e["prompt"] for e in generate(s, "train", 60, 0)] for c, s in prompts.items()}
    routed = build_routed(base_model, packs, train, steps=200)
    return {"base": base_model, "packs": packs, "grafted": grafted, "tok": tok, "routed": routed, "tmp": tmp}


def load(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


def forced(base, packs, choice, hard=True):
    router = Router([p.name for p in packs] + [NONE], 64, hard=hard)
    router.bias[router.classes.index(choice)] = 10.0 if hard else 1.0
    return RoutedModel(load(base), packs, router, base).eval()


def batch(tok, prompts):
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def test_factors_multiply_to_the_decoded_delta(setup):
    pack = setup["packs"][0]
    key = "model.layers.0.mlp.down_proj.weight"
    u, v = pack.factors(key)
    assert u.shape[1] == v.shape[1] == 4 and len(pack.manifest["tensors"][key]["bands"]) == 2
    torch.testing.assert_close(u @ v.T, pack.delta(key), atol=1e-6, rtol=0)
    assert pack.factors("model.embed_tokens.weight") is None and pack.factors("model.norm.weight") is None


@pytest.mark.parametrize("choice", [*SKILLS, NONE])
def test_forced_route_equals_dense_graft_of_that_pack(setup, choice):
    enc = batch(setup["tok"], ["rev:abc=", "add:12+07=", "copy:x="])
    routed = forced(setup["base"], setup["packs"], choice)
    with torch.no_grad():
        got = routed(**enc).logits
        want = load(setup["grafted"][choice])(**enc).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    expect = [[0.0 if choice == NONE else float(p.name == choice) for p in setup["packs"]]] * 3
    assert routed.weights(enc["input_ids"], enc["attention_mask"]).tolist() == expect


def test_forced_route_equals_dense_graft_on_gpt2(tmp_path):
    """GPT-2 layout: Conv1D weights stored (in, out), LayerNorm biases, shared position ids, head tied to wte."""
    base = make_base(tmp_path / "gpt2", family="gpt2")
    reader = CheckpointReader(base)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    for k in reader.keys():
        rows, *cols = reader.shape(k)
        if cols and not k.endswith(("wte.weight", "wpe.weight")):
            deltas[k] = LowRankDelta(k, torch.randn(3, cols[0], generator=g), torch.randn(rows, 3, generator=g) * 0.05, 1.0)
        else:
            deltas[k] = torch.randn(reader.shape(k), generator=g) * 0.3
    pack = pack_skill("s", deltas, base_fingerprint(reader, list(deltas)), SETTINGS)
    graft(base, [pack], tmp_path / "grafted")
    router = Router(["s", NONE], 64)
    router.bias[0] = 10.0
    routed = RoutedModel(load(base), [pack], router, base).eval()
    enc = batch(AutoTokenizer.from_pretrained(str(base)), ["rev:abc=", "copy:x="])
    with torch.no_grad():
        torch.testing.assert_close(routed(**enc).logits, load(tmp_path / "grafted")(**enc).logits, atol=1e-5, rtol=1e-5)


def test_soft_routing_equals_graft_scaled_by_probabilities(setup, tmp_path):
    routed = forced(setup["base"], setup["packs"], "reverse", hard=False)
    enc = batch(setup["tok"], ["rev:abc=", "copy:x="])
    w = routed.weights(enc["input_ids"], enc["attention_mask"])
    assert 0 < w[0, 1] < w[0, 0] < 1 and torch.equal(w[0], w[1])
    graft(setup["base"], setup["packs"], tmp_path / "soft", scales=w[0].tolist())
    with torch.no_grad():
        torch.testing.assert_close(routed(**enc).logits, load(tmp_path / "soft")(**enc).logits, atol=1e-5, rtol=1e-5)


def test_trained_router_separates_prompt_families(setup):
    routed, tok = setup["routed"], setup["tok"]
    for cls, skill in (("reverse", "reverse"), ("add", "add"), (NONE, "general")):
        enc = batch(tok, [e["prompt"] for e in generate(skill, "test", 40, 1)])
        got = routed.decisions(enc["input_ids"], enc["attention_mask"])
        assert sum(g == cls for g in got) / len(got) >= 0.95, (cls, got)


def test_generate_routes_each_row_of_a_mixed_left_padded_batch(setup):
    routed, tok = setup["routed"], setup["tok"]
    prompts = ["rev:abcdefg=", "add:03+04=", "copy:k=", "add:51+62=", "rev:xy="]
    enc = batch(tok, prompts)
    assert not routed.training and not routed.model.training  # the wrapper mirrors the base's eval mode
    routes = routed.decisions(enc["input_ids"], enc["attention_mask"])
    assert routes == ["reverse", "add", NONE, "add", "reverse"]
    kw = dict(do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        got = routed.generate(**enc, **kw)
        want = {c: load(f).generate(**enc, **kw) for c, f in setup["grafted"].items()}
    for row, cls in enumerate(routes):
        assert torch.equal(got[row], want[cls][row]), (row, cls)
    new = enc["input_ids"].shape[1]
    assert not torch.equal(want["reverse"][0, new:], want[NONE][0, new:])  # the deltas really change the output


def test_save_load_roundtrip_and_refusals(setup, tmp_path):
    routed, tok = setup["routed"], setup["tok"]
    routed.save(tmp_path / "routed")
    back = RoutedModel.load(tmp_path / "routed").eval()
    enc = batch(tok, ["rev:hello=", "add:01+02=", "copy:q1="])
    with torch.no_grad():
        assert torch.equal(back(**enc).logits, routed(**enc).logits)
    assert torch.equal(back.weights(enc["input_ids"], enc["attention_mask"]), routed.weights(enc["input_ids"], enc["attention_mask"]))

    other = make_base(tmp_path / "other", seed=7)  # same shapes, other weights
    with pytest.raises(SkillPackError, match="differs from the base"):
        RoutedModel.load(tmp_path / "routed", base=other)
    f = tmp_path / "routed" / "packs" / "add" / "pack.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(SkillPackError, match="pack.safetensors: checksum mismatch"):
        RoutedModel.load(tmp_path / "routed")


def test_pack_for_another_base_is_refused(setup, tmp_path):
    other = make_base(tmp_path / "other", seed=7)
    router = Router([p.name for p in setup["packs"]] + [NONE], 64)
    with pytest.raises(SkillPackError, match="differs from the base the pack was made for"):
        RoutedModel(load(other), setup["packs"], router, other)


def all_states_features(model, input_ids, attention_mask, layer):
    """The feature as it was first defined: every hidden state kept, one read (the reference for the feature pass)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        states = model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                  output_hidden_states=True, use_cache=False).hidden_states
    h, m = states[layer].float(), attention_mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def four_layer_model(family):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=4, n_head=4, n_positions=32)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=32)).eval()


def left_padded():
    ids = torch.randint(1, 40, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1, 2, -1, -2])
def test_feature_pass_equals_all_hidden_states_and_runs_only_the_layers_up_to_it(family, layer):
    model = four_layer_model(family)
    ids, mask = left_padded()
    blocks = model.base_model.layers if family == "llama" else model.base_model.h
    ran = [0] * len(blocks)
    hooks = [b.register_forward_hook(lambda *_, i=i: ran.__setitem__(i, ran[i] + 1)) for i, b in enumerate(blocks)]
    got = pooled_features(model, ids, mask, layer)
    for h in hooks:
        h.remove()
    assert not any(b._forward_hooks or b._forward_pre_hooks for b in blocks)  # the capture hook is gone
    k = layer % (len(blocks) + 1)
    assert ran == [1] * k + [0] * (len(blocks) - k)  # layers k.. (those after the routing state) never ran
    assert torch.equal(got, all_states_features(model, ids, mask, layer))


def test_feature_pass_refuses_an_unknown_layer_and_reads_every_state_where_no_layer_is_declared():
    model = four_layer_model("llama")
    ids, mask = left_padded()
    for layer in (5, -6):
        with pytest.raises(ValueError, match="out of range: the model has hidden states 0..4"):
            pooled_features(model, ids, mask, layer)
    model.base_model._can_record_outputs = {}  # a family that records hidden states by hand (Falcon, Bloom, GPT-J, ...)
    assert torch.equal(pooled_features(model, ids, mask, 1), all_states_features(model, ids, mask, 1))
    with pytest.raises(ValueError, match="out of range: the model has hidden states 0..4"):
        pooled_features(model, ids, mask, 5)


class AllStatesRouted(RoutedModel):
    """A RoutedModel whose routing features are read from every hidden state, as they were first computed."""

    def _features(self, input_ids, attention_mask):
        with self.deltas_off():
            return all_states_features(self.model, input_ids, attention_mask, self.router.layer).to(self.router.mean.device)


def test_generate_routes_once_per_call_on_a_middle_layer_as_the_all_states_pass_did(setup, monkeypatch):
    base, packs, tok = setup["base"], setup["packs"], setup["tok"]
    train = {c: [e["prompt"] for e in generate(s, "train", 30, 0)] for c, s in (("reverse", "reverse"), ("add", "add"),
                                                                                (NONE, "general"))}
    router = train_router(load(base), tok, train, layer=1, steps=100)
    new, old = RoutedModel(load(base), packs, router, base).eval(), AllStatesRouted(load(base), packs, router, base).eval()
    enc = batch(tok, ["rev:abcdefg=", "add:03+04=", "copy:k=", "add:51+62=", "rev:xy="])
    w = new.weights(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(w, old.weights(enc["input_ids"], enc["attention_mask"])) and len(set(map(tuple, w.tolist()))) > 1

    passes = []
    counted = routing.pooled_features
    monkeypatch.setattr(routing, "pooled_features", lambda *a, **k: passes.append(1) or counted(*a, **k))
    kw = dict(do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        got = new.generate(**enc, **kw)
        assert len(passes) == 1  # routed at prefill, reused by every decode step
        want = old.generate(**enc, **kw)
        uncached = new.generate(**enc, **kw, use_cache=False)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))
    assert len(passes) == 1 + len(uncached.logits)  # without a cache every step is a prefill and is routed anew
