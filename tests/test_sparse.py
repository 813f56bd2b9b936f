"""Sparse adapters: masks at initialization by rule, SHiRA adapters saved and read back as sparse deltas, the
sparse SkillPack scheme, routed application, and one-line refusals of settings and files that cannot work.
(Training one through the pipeline under ZeRO-3, and porting it, is the port recipe's end-to-end test.)"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.checkpoint import CheckpointReader
from graft.data import collate, encode_examples
from graft.experts import Expert
from graft.fingerprint import base_fingerprint
from graft.grafting import graft
from graft.model_checks import ModelCheckError, check_sparse_adapter, check_sparse_targets
from graft.routing import NONE, RoutedModel, Router
from graft.skillpack import PackSettings, SkillPack, SkillPackError, index_bits, pack_skill
from graft.sparse import (SparseDelta, SparseError, load_sparse, masks_for, read_sparse_deltas, shira_model, shira_rank,
                          target_linears, top_masks)
from graft.testbed.skills import generate
from tests.conftest import make_base, run_cli

torch.set_num_threads(1)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def model_of(base):
    return AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True).eval()


def skill_batches(base, n=2, size=8):
    tok = AutoTokenizer.from_pretrained(str(base))
    rows = encode_examples(tok, generate("reverse", "train", n * size, 0), 32, "answer")
    return [collate(rows[i:i + size], tok.pad_token_id) for i in range(0, len(rows), size)]


@pytest.fixture(scope="module")
def sparse_adapter(base_model, tmp_path_factory):
    """A SHiRA adapter (snip masks, r=3 on q/v/down) with random values, saved by PEFT; and its PEFT model's logits."""
    folder = tmp_path_factory.mktemp("sparse") / "adapter"
    model = model_of(base_model)
    r, masks = masks_for(model, TARGETS, "snip", 0.1, skill_batches(base_model), seed=0)
    peft_model = shira_model(model, masks, r)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "shira_weight" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(str(folder))
    ids = torch.tensor([[5, 9, 12, 7, 3, 4]])
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return {"folder": folder, "r": r, "masks": masks, "ids": ids, "logits": logits}


def test_keep_fraction_becomes_one_shira_rank_sized_like_a_lora():
    shapes = [(64, 64), (64, 64), (64, 128)]
    # Σ m·n = 16384, Σ (m + n) = 448: keep 0.1 -> r = round(3.66) = 4, a rank-4 LoRA's count
    assert shira_rank(shapes, 0.1) == 4
    assert shira_rank(shapes, 0.001) == 1
    assert shira_rank(shapes, 0.5, lora_rank=16) == 16
    for bad in (0, -0.1, 1.5):
        with pytest.raises(SparseError, match="keep_fraction must be in"):
            shira_rank(shapes, bad)
    with pytest.raises(SparseError, match=r"asks a \(64, 64\) module for 4224 of its 4096 weights"):
        shira_rank(shapes, 0.9)


def test_masks_keep_exactly_r_times_m_plus_n_of_the_top_scores():
    scores = {"a": torch.arange(12.0).view(3, 4) + 1, "b": torch.rand(4, 4) + 0.1}
    masks = top_masks(scores, 1)
    assert int(masks["a"].sum()) == 7 and int(masks["b"].sum()) == 8
    assert masks["a"].view(-1)[5:].all() and not masks["a"].view(-1)[:5].any()  # the 7 largest scores
    with pytest.raises(SparseError, match="module 'z': every mask score is zero"):
        top_masks({"z": torch.zeros(4, 4)}, 1)
    with pytest.raises(SparseError, match="module 'n': mask scores hold NaN"):
        top_masks({"n": torch.full((4, 4), float("nan"))}, 1)


def test_rules_score_what_they_say(base_model):
    model = model_of(base_model)
    modules = target_linears(model, TARGETS)
    assert sorted(modules) == sorted(f"model.layers.{i}.{p}" for i in (0, 1)
                                     for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    r, by_magnitude = masks_for(model, TARGETS, "magnitude", 0.1, [], seed=0)
    w = modules["model.layers.0.self_attn.q_proj"].weight.detach().abs()
    kept = w[by_magnitude["model.layers.0.self_attn.q_proj"].bool()]
    assert kept.min() >= w[~by_magnitude["model.layers.0.self_attn.q_proj"].bool()].max()
    _, rand0 = masks_for(model, TARGETS, "random", 0.1, [], seed=0)
    _, rand0b = masks_for(model, TARGETS, "random", 0.1, [], seed=0)
    _, rand1 = masks_for(model, TARGETS, "random", 0.1, [], seed=1)
    key = "model.layers.1.mlp.down_proj"
    assert torch.equal(rand0[key], rand0b[key]) and not torch.equal(rand0[key], rand1[key])
    # snip: |g ⊙ θ| of the base's loss on the skill's batches
    batches = skill_batches(base_model)
    _, by_snip = masks_for(model, TARGETS, "snip", 0.1, batches, seed=0)
    reference = model_of(base_model)
    for batch in batches:
        reference(**batch).loss.backward()
    lin = dict(reference.named_modules())[key]
    score = (lin.weight.grad * lin.weight.detach()).abs()
    threshold = score.view(-1).topk(int(by_snip[key].sum())).values.min()
    assert bool((score[by_snip[key].bool()] >= threshold).all())
    assert all(p.grad is None for p in model.parameters())  # scoring leaves the model as it was
    with pytest.raises(SparseError, match="'snip' needs batches"):
        masks_for(model, TARGETS, "snip", 0.1, [], seed=0)


def test_targets_that_cannot_be_sparse_are_refused(base_model, tmp_path):
    with pytest.raises(SparseError, match="'no_such_proj' matches no module"):
        target_linears(model_of(base_model), ["no_such_proj"])
    with pytest.raises(ModelCheckError, match="'no_such_proj' matches no module"):
        check_sparse_targets(base_model, ["no_such_proj"], 0.1)
    with pytest.raises(ModelCheckError, match="keep_fraction 0.95 needs r="):
        check_sparse_targets(base_model, TARGETS, 0.95)
    gpt2 = make_base(tmp_path / "gpt2", family="gpt2")
    with pytest.raises(ModelCheckError, match="module 'transformer.h.0.attn.c_attn' is a Conv1D; .* only nn.Linear"):
        check_sparse_targets(gpt2, ["c_attn"], 0.1)
    assert len(check_sparse_targets(base_model, TARGETS, 0.1)) == 6


def test_saved_adapter_reads_back_as_the_sparse_deltas_peft_applies(base_model, sparse_adapter):
    deltas = read_sparse_deltas(sparse_adapter["folder"], base_model)
    assert sorted(k.removesuffix(".weight") for k in deltas) == sorted(sparse_adapter["masks"])
    for key, d in deltas.items():
        mask = sparse_adapter["masks"][key.removesuffix(".weight")]
        assert d.kept == int(mask.sum()) == sparse_adapter["r"] * sum(mask.shape)
        assert torch.equal(d.dense() != 0, mask.bool())  # the trained entries are the masked ones, no others
    with torch.no_grad():
        merged = load_sparse(base_model, sparse_adapter["folder"])(input_ids=sparse_adapter["ids"]).logits
        as_expert = Expert(sparse_adapter["folder"], "sparse").load(base_model)(input_ids=sparse_adapter["ids"]).logits
    torch.testing.assert_close(merged, sparse_adapter["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(as_expert, merged)
    assert check_sparse_adapter(sparse_adapter["folder"], base_model) == sum(d.kept for d in deltas.values())


def _damaged(src, dst, edit):
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


def test_damaged_sparse_adapters_are_refused_naming_the_tensor(base_model, sparse_adapter, adapter, tmp_path):
    src = sparse_adapter["folder"]
    key = "base_model.model.model.layers.0.self_attn.q_proj"

    def out_of_range(t):
        t[f"{key}.shira_indices"][0, 0] = 64

    def repeated(t):
        t[f"{key}.shira_indices"][:, 1] = t[f"{key}.shira_indices"][:, 0]

    def missing(t):
        del t[f"{key}.shira_indices"]

    def empty(t):
        t[f"{key}.shira_weight"], t[f"{key}.shira_indices"] = torch.zeros(0), torch.zeros(2, 0, dtype=torch.int32)

    cases = {"out": (out_of_range, "holds an index outside the tensor's shape"), "rep": (repeated, "holds a repeated index"),
             "miss": (missing, f"tensor '{key}.shira_indices' is missing"), "empty": (empty, "keeps no entry")}
    for name, (edit, message) in cases.items():
        with pytest.raises(SparseError, match=message):
            read_sparse_deltas(_damaged(src, tmp_path / name, edit), base_model)
    with pytest.raises(ModelCheckError, match="holds a repeated index"):
        check_sparse_adapter(tmp_path / "rep", base_model)
    with pytest.raises(SparseError, match="peft_type: a sparse adapter is a PEFT SHIRA adapter, this is 'LORA'"):
        read_sparse_deltas(adapter)
    with pytest.raises(SparseError, match="has no tensor 'model.layers.0.self_attn.x_proj.weight' in the base"):
        read_sparse_deltas(_damaged(src, tmp_path / "renamed", lambda t: t.update(
            {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.x_proj"): t.pop(k) for k in list(t) if key in k})),
            base_model)


def test_sparse_pack_stores_positions_and_values_and_grafts_and_routes_like_the_delta(base_model, sparse_adapter, tmp_path):
    deltas = read_sparse_deltas(sparse_adapter["folder"], base_model)
    reader = CheckpointReader(base_model)
    pack = pack_skill("rev", deltas, base_fingerprint(reader, list(deltas)), PackSettings())
    for key, d in deltas.items():
        entry = pack.manifest["tensors"][key]
        bits = index_bits(64 * 64 if "down" not in key else 64 * 128)
        assert entry["scheme"] == "sparse" and entry["index_bits"] == bits == 12 + ("down" in key)
        assert entry["bytes"] == -(-d.kept * bits // 8) + 2 * d.kept
        torch.testing.assert_close(pack.delta(key), d.dense(), atol=2e-4, rtol=1e-3)  # fp16 values
    pack.save(tmp_path / "pack")
    loaded = SkillPack.load(tmp_path / "pack")
    graft(base_model, [loaded], tmp_path / "grafted")
    router = Router(["rev", NONE], 64)
    router.bias[0] = 10.0
    with torch.no_grad():
        routed = RoutedModel(model_of(base_model), [loaded], router, base_model).eval()(input_ids=sparse_adapter["ids"]).logits
        grafted = model_of(tmp_path / "grafted")(input_ids=sparse_adapter["ids"]).logits
    torch.testing.assert_close(routed, grafted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grafted, sparse_adapter["logits"], atol=1e-3, rtol=1e-3)
    with pytest.raises(SkillPackError, match="the sparse scheme takes a sparse adapter's delta"):
        from graft.skillpack import SCHEMES
        SCHEMES.get("sparse").encode(torch.ones(2, 2), PackSettings(), None)


def test_sparse_delta_dense():
    d = SparseDelta(torch.tensor([1, 5]), torch.tensor([2.0, -1.0]), (2, 3))
    assert d.dense().tolist() == [[0, 2, 0], [0, 0, -1]] and d.kept == 2


def test_cli_packs_a_sparse_adapter_and_refuses_one_given_as_lora(base_model, sparse_adapter, tmp_path):
    ok = run_cli("pack", sparse_adapter["folder"], "--kind", "sparse", "--base", base_model, "--out", tmp_path / "pack")
    assert ok.returncode == 0, ok.stderr
    manifest = json.loads((tmp_path / "pack" / "skillpack.json").read_text())
    assert {e["scheme"] for e in manifest["tensors"].values()} == {"sparse"} and manifest["source"]["expert_kind"] == "sparse"
    wrong = run_cli("pack", sparse_adapter["folder"], "--base", base_model, "--out", tmp_path / "as-lora")
    assert wrong.returncode == 2 and len(wrong.stderr.strip().splitlines()) == 1 and "peft_type" in wrong.stderr
    assert not (tmp_path / "as-lora").exists()


def test_a_sparse_patch_ports_to_a_new_base_as_its_entries(base_model, sparse_adapter, tmp_path):
    from graft.port import ported_model

    new = make_base(tmp_path / "v2", seed=5)
    deltas = Expert(sparse_adapter["folder"], "sparse").deltas(base_model)
    with torch.no_grad():
        ported = ported_model(new, deltas)(input_ids=sparse_adapter["ids"]).logits
        direct = load_sparse(new, sparse_adapter["folder"])(input_ids=sparse_adapter["ids"]).logits
    torch.testing.assert_close(ported, direct)
