import pytest
import torch

from graft.checkpoint import CheckpointReader
from graft.fingerprint import base_fingerprint
from graft.fusion import graft_protected, protection_mask
from graft.grafting import graft
from graft.lora import read_lora_deltas
from graft.skillpack import PackSettings, pack_skill
from tests.conftest import make_adapter

EXACT = PackSettings(energy=1.0, bits=(8,), band_fractions=(1.0,))


def test_protection_mask_picks_top_fraction():
    imp = torch.tensor([[0.1, 5.0], [3.0, 0.2]])
    assert protection_mask(imp, 0.5).tolist() == [[False, True], [True, False]]
    assert not protection_mask(imp, 0.0).any()


def test_protected_grafting_shields_earlier_skill(base_model, tmp_path):
    reader = CheckpointReader(base_model)
    packs, scores = [], []
    for seed in (1, 2):
        ad = make_adapter(base_model, tmp_path / f"a{seed}", seed=seed)
        d = read_lora_deltas(ad)
        packs.append(pack_skill(f"s{seed}", d, base_fingerprint(reader, list(d)), EXACT))
        scores.append({k: v.dense().abs() for k, v in d.items()})  # "importance" = where the skill changed weights
    graft_protected(base_model, packs, scores, tmp_path / "protected", protect_fraction=0.3)
    graft(base_model, packs[:1], tmp_path / "first")
    graft(base_model, packs, tmp_path / "additive")
    prot, first, add = (CheckpointReader(tmp_path / n) for n in ("protected", "first", "additive"))
    key = next(iter(packs[0].keys()))
    mask = protection_mask(scores[0][key], 0.3)
    # on skill 1's most important entries, skill 2 changed nothing; elsewhere both add up
    torch.testing.assert_close(prot.get(key)[mask], first.get(key)[mask])
    torch.testing.assert_close(prot.get(key)[~mask], add.get(key)[~mask])
    assert not torch.allclose(add.get(key)[mask], first.get(key)[mask])


def test_routed_fusion_writes_a_folder_the_evaluate_stage_scores(base_model, tmp_path):
    """fuse_into(method='routed') trains the router and writes a routed folder; evaluation loads it, not a checkpoint."""
    from graft.data import write_jsonl
    from graft.fusion import FusionSettings, fuse_into
    from graft.routing import RoutedModel, is_routed
    from graft.testbed.skills import generate
    from pipelines.cache import Ref
    from pipelines.spec import EvaluateSpec
    from pipelines.evaluation import EvaluateRequest, evaluate_model
    from pipelines.placement import Placement

    reader = CheckpointReader(base_model)
    d = read_lora_deltas(make_adapter(base_model, tmp_path / "a", seed=3))
    pack = pack_skill("reverse", d, base_fingerprint(reader, list(d)), EXACT)
    prompts = {"reverse": [r["prompt"] for r in generate("reverse", "train", 60, 0)],
               "none": [r["prompt"] for r in generate("general", "train", 60, 0)]}
    out = tmp_path / "routed"
    out.mkdir()
    report = fuse_into(base_model, [pack], [None], out, "routed", FusionSettings(router_prompts=prompts))
    assert report["method"] == "routed" and is_routed(out) and not is_routed(base_model)
    model = RoutedModel.load(out)
    tests = {"reverse": generate("reverse", "test", 20, 0), "general": generate("general", "test", 20, 0)}
    routes = {s: model.decisions(*_encoded(base_model, [r["prompt"] for r in rows])) for s, rows in tests.items()}
    assert routes["reverse"].count("reverse") >= 19 and routes["general"].count("none") >= 19
    files = {}
    for s, rows in tests.items():
        write_jsonl(tmp_path / f"{s}.jsonl", rows)
        files[s] = str(tmp_path / f"{s}.jsonl")
    req = EvaluateRequest(models=(("grafted", Ref(str(out), "k"), None),), expert_kind="lora", tokenizer=Ref(str(base_model), "t"),
                          tests=tuple((s, Ref(f, s)) for s, f in files.items()), settings=EvaluateSpec(max_new_tokens=8, batch_size=16),
                          trust_remote_code=False, placement=Placement("cpu", "float32", 0.0, 1))
    acc = evaluate_model(Ref(str(out), "k"), None, req, str(tmp_path / "digests"))
    assert set(acc) == {"reverse", "general"} and all(0.0 <= v <= 1.0 for v in acc.values())
    with pytest.raises(ValueError, match="needs example prompts"):
        fuse_into(base_model, [pack], [None], tmp_path, "routed", FusionSettings())


def _encoded(folder, prompts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]
