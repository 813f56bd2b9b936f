import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.checkpoint import CheckpointReader
from graft.data import collated_batches, encode_examples
from graft.fingerprint import base_fingerprint
from graft.grid_tuning import tune_grids
from graft.lora import load_with_adapter, read_lora_deltas
from graft.skillpack import PackSettings, SkillPack, pack_skill

WORDS = ("abc", "hello", "graft", "moon", "tree", "xyz", "river", "stone")


def test_tuned_grids_fit_the_expert_better_in_the_same_bytes(base_model, adapter, tmp_path):
    deltas = read_lora_deltas(adapter)
    reader = CheckpointReader(base_model)
    pack = pack_skill("rev", deltas, base_fingerprint(reader, list(deltas)),
                      PackSettings(bits=(2,), band_fractions=(1.0,), budget=0.1))  # coarse: room to improve
    tok = AutoTokenizer.from_pretrained(str(base_model))
    rows = [{"prompt": f"rev:{w}=", "answer": w[::-1]} for w in WORDS]
    batches = list(collated_batches(encode_examples(tok, rows, 32), tok.pad_token_id, 4))
    base = AutoModelForCausalLM.from_pretrained(str(base_model))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = tune_grids(pack, base, load_with_adapter(base_model, adapter), batches, steps=15)

    report = tuned.manifest["grid_tuning"]
    assert report["matrices"] == len(deltas) and report["kl_after"] < 0.9 * report["kl_before"]
    assert tuned.manifest["total_bytes"] == pack.manifest["total_bytes"]
    for name, t in pack.tensors.items():  # codes untouched, grids moved
        assert torch.equal(tuned.tensors[name], t) == (not name.endswith((".min", ".step")))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is given back as it was
    assert SkillPack.load(tuned.save(tmp_path / "tuned")).manifest["grid_tuning"] == report
