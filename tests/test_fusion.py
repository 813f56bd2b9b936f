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
