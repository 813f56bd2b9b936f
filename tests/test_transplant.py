"""ConTrans: concept vectors, the affine map, injection by hook, the transplant folder that loads only onto its target,
`graft transplant`, and the transplant recipe end to end."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.data import write_jsonl
from graft.testbed.models import init_model, model_config
from graft.testbed.skills import generate
from graft.testbed.tokenizer import save_char_tokenizer
from graft.transplant import (Transplant, TransplantError, concept_vectors, decoder_layers, fit_affine, inject,
                              last_token_states, model_fingerprint, pair_texts, random_direction, with_pairs)
from tests.conftest import REPO, run_cli, run_job_file

torch.set_num_threads(1)


def make_model(folder, size="tiny", seed=0):
    tok = save_char_tokenizer(folder)
    init_model(model_config("llama", size, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id), seed, folder)
    return folder


def load(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True).eval(), AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transplant")
    return {"source": make_model(tmp / "source"), "target": make_model(tmp / "target", "small", seed=1), "tmp": tmp}


def test_the_affine_map_recovers_a_linear_relation_and_reports_held_out_r2():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(200, 8, generator=g), torch.randn(8, 5, generator=g), torch.randn(5, generator=g)
    m = fit_affine(x, x @ w + b)
    assert m.fitted_on == 160 and m.r2_heldout > 0.9999
    torch.testing.assert_close(m.weight, w, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m.direction(torch.ones(8)), torch.ones(8) @ w, atol=1e-4, rtol=1e-4)  # no bias for a direction
    noisy = fit_affine(x, torch.randn(200, 5, generator=g))
    assert noisy.r2_heldout < 0.2
    with pytest.raises(TransplantError, match="not the same prompts"):
        fit_affine(x, x[:10] @ w)
    with pytest.raises(TransplantError, match="too few to fit a map"):
        fit_affine(x[:2], x[:2] @ w)
    with pytest.raises(TransplantError, match="width"):
        m.direction(torch.ones(7))


def test_the_map_sees_both_sides_of_the_pairs_in_one_order_for_both_models():
    """`with_pairs` puts the pairs' states among the shared ones, shuffled the same way whatever the values, so the
    source's and the target's rows still match and the held-out fifth holds both kinds."""
    shared, pos, neg = (torch.full((2, n, 3), float(k)) for k, n in ((0, 40), (1, 10), (2, 10)))
    mixed = with_pairs(shared, pos, neg)
    assert mixed.shape == (2, 60, 3)
    kinds = mixed[0, :, 0]
    assert sorted(kinds.tolist()) == [0.0] * 40 + [1.0] * 10 + [2.0] * 10
    assert {1.0, 2.0} <= set(kinds[48:].tolist())  # fit_affine holds out the last 20%
    assert torch.equal(with_pairs(shared + 5, pos + 5, neg + 5)[0, :, 0] - 5, kinds)


def test_concept_vectors_are_the_mean_difference_or_its_principal_direction():
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(2, 50, 6, generator=g)
    direction = torch.tensor([1.0, 2, 0, 0, 0, 0])
    scale = 1 + torch.rand(50, generator=g)
    pos = neg + scale[None, :, None] * direction
    mean = concept_vectors(pos, neg, "mean")
    torch.testing.assert_close(mean[1], scale.mean() * direction)
    pca = concept_vectors(pos, neg, "pca")
    assert torch.nn.functional.cosine_similarity(pca[0], direction, dim=0) > 0.999  # and points the mean's way
    with pytest.raises(TransplantError, match="at least 2 positive/negative pairs"):
        concept_vectors(pos[:, :1], neg[:, :1])
    with pytest.raises(TransplantError, match="not paired"):
        concept_vectors(pos, neg[:, :10])


def test_pairs_come_from_concept_rows_or_positive_negative_texts():
    rows = generate("concept", "train", 3, 0)
    pos, neg = pair_texts(rows)  # the testbed's: the prompt that asks for the concept, and the same one that does not
    assert pos[0] == rows[0]["positive"] and pos[0].startswith("shout:") and neg[0] == rows[0]["prompt"]
    answered = [{"prompt": "q:", "answer": "A", "negative": "a"}]
    assert pair_texts(answered) == (["q:A"], ["q:a"])
    assert pair_texts([{"positive": "a", "negative": "b"}]) == (["a"], ["b"])
    with pytest.raises(TransplantError, match="p.jsonl: row 1: no negative text"):
        pair_texts([{"positive": "a", "negative": "b"}, {"positive": "c"}], "p.jsonl")
    with pytest.raises(TransplantError, match="no positive/negative pairs"):
        pair_texts([])


def test_states_are_each_layers_output_at_the_last_token_whatever_the_padding(models):
    model, tok = load(models["source"])
    texts = ["copy:ab=", "copy:abcdefg="]
    batched = last_token_states(model, tok, texts)
    assert batched.shape == (2, 2, 64)
    for i, text in enumerate(texts):
        alone = model(**tok([text], return_tensors="pt"), output_hidden_states=True).hidden_states
        torch.testing.assert_close(batched[0, i], alone[1][0, -1], atol=1e-5, rtol=1e-5)  # layer 0's output
    assert tok.padding_side == "right" or tok.padding_side == AutoTokenizer.from_pretrained(str(models["source"])).padding_side


def test_injection_adds_alpha_v_to_one_layer_at_every_position_and_nothing_after(models):
    model, tok = load(models["target"])
    enc = tok(["copy:abc="], return_tensors="pt")
    v = torch.randn(128)
    seen = {}
    for i in (1, 2):  # what layers 1 and 2 receive: the outputs of layers 0 and 1
        decoder_layers(model)[i].register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"]).clone()),
            with_kwargs=True)
    with torch.no_grad():
        model(**enc)
        plain = dict(seen)
        with inject(model, 1, v, 2.0):
            model(**enc)
        steered = dict(seen)
        after = model(**enc).logits
        with inject(model, 1, v, 0.0):
            zero = model(**enc).logits
    torch.testing.assert_close(steered[1], plain[1])  # layer 0's output untouched
    torch.testing.assert_close(steered[2] - 2.0 * v, plain[2], atol=1e-5, rtol=1e-5)  # layer 1's, at every position
    torch.testing.assert_close(zero, after)
    assert not decoder_layers(model)[1]._forward_hooks
    with pytest.raises(TransplantError, match="layer 4 is out of range: the model has decoder layers 0..3"):
        with inject(model, 4, v, 1.0):
            pass
    with pytest.raises(TransplantError, match="vector of width 64 does not fit the model's hidden size 128"):
        with inject(model, 1, torch.ones(64), 1.0):
            pass


def test_a_transplant_loads_only_onto_the_model_it_was_made_for(models, tmp_path):
    target = models["target"]
    model, tok = load(target)
    t = Transplant(random_direction(torch.ones(128), 0), 2, 1.5, model_fingerprint(target), model_fingerprint(models["source"]),
                   {"affine_r2_heldout": 0.5})
    t.save(tmp_path / "t")
    back = Transplant.load(tmp_path / "t")
    assert back.layer == 2 and back.alpha == 1.5 and torch.equal(back.vector, t.vector)
    enc = tok(["copy:ab="], return_tensors="pt")
    with torch.no_grad(), back.applied(model, target):
        steered = model(**enc).logits
    with torch.no_grad(), inject(model, 2, t.vector, 1.5):
        torch.testing.assert_close(model(**enc).logits, steered)
    other = make_model(tmp_path / "other", "small", seed=7)
    with pytest.raises(TransplantError, match="not the model this transplant was made for .*differs"):
        with back.applied(load(other)[0], other):
            pass
    with pytest.raises(TransplantError, match="not the model this transplant was made for .*hidden_size"):
        with back.applied(load(models["source"])[0], models["source"]):
            pass
    manifest = json.loads((tmp_path / "t" / "transplant.json").read_text())
    manifest["alpha"] = 50.0
    (tmp_path / "t" / "transplant.json").write_text(json.dumps(manifest))
    with pytest.raises(TransplantError, match="content_hash: does not match"):
        Transplant.load(tmp_path / "t")


def _files(models):
    tmp = models["tmp"]
    write_jsonl(tmp / "pairs.jsonl", generate("concept", "train", 20, 0))
    write_jsonl(tmp / "prompts.jsonl", generate("general", "train", 40, 0))
    return tmp / "pairs.jsonl", tmp / "prompts.jsonl"


def test_graft_transplant_writes_a_folder_and_refuses_bad_input_in_one_line(models, tmp_path):
    pairs, prompts = _files(models)
    common = ["transplant", "--source", models["source"], "--target", models["target"], "--pairs", pairs, "--prompts", prompts]
    ok = run_cli(*common, "--layer", 3, "--alpha", 2, "--out", tmp_path / "t")
    assert ok.returncode == 0, ok.stderr
    made = Transplant.load(tmp_path / "t")
    assert made.layer == 3 and made.info["source_layer"] == 1 and made.vector.shape == (128,)
    one_sided = tmp_path / "one.jsonl"
    write_jsonl(one_sided, [{"positive": "a", "negative": "b"}, {"positive": "c"}])
    for extra, says in ((["--layer", 9], "--layer 9 is out of range: the model has decoder layers 0..3"),
                        (["--layer", 1, "--source-layer", 5], "--source-layer 5 is out of range"),
                        (["--layer", 1, "--vector", "median"], "unknown concept vector 'median'")):
        bad = run_cli(*common, *extra, "--out", tmp_path / "bad")
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    bad = run_cli("transplant", "--source", models["source"], "--target", models["target"], "--pairs", one_sided,
                  "--prompts", prompts, "--layer", 1, "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "row 1: no negative text" in bad.stderr
    assert not (tmp_path / "bad").exists()


# end to end ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_transplant_recipe_end_to_end_on_local_models(models, tmp_path):
    """Concepts taken in a local source on the job's concept pairs, mapped into a wider, deeper local target, swept over
    layer × α with a random control, the best point saved as a transplant that loads onto the target."""
    pairs, ordinary = tmp_path / "pairs.jsonl", tmp_path / "ordinary.jsonl"
    write_jsonl(pairs, generate("concept", "train", 12, 0))
    write_jsonl(ordinary, generate("sort", "train", 40, 0))  # the user's own shared prompts, not the testbed's
    job = {"name": "tp", "recipe": "transplant", "base": str(models["source"]), "output_dir": str(tmp_path / "runs"),
           "tracking": {"experiment": "tp"}, "skills": [{"name": "concept", "train": str(pairs), "eval": str(pairs)},
                                                        {"name": "mine", "train": str(ordinary), "eval": str(ordinary)}],
           "testbed": {"pretrain_examples": 60, "eval_examples": 8},
           "transplant": {"source": str(models["source"]), "target": str(models["target"]), "target_layers": [1, 3],
                          "concept": "concept", "general": "mine",
                          "alphas": [0, 1], "pairs": 12, "prompts": 40, "examples": 4, "shards": 2},
           "evaluate": {"max_new_tokens": 4}}
    proc = run_job_file(tmp_path, job)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "runs" / "tp"
    (concepts,) = (root / "concepts").glob("concepts-*")
    info = json.loads((concepts / "concepts.json").read_text())
    assert info["pairs"] == 12 and info["prompts"] == 40 and (info["source_layers"], info["target_layers"]) == (2, 4)
    points = sorted(p.name.rsplit("-", 1)[0] for p in (root / "transplant").glob("L*-a*"))
    assert points == ["L1-a0", "L1-a1", "L3-a0", "L3-a1"]
    (report,) = (root / "transplant").glob("report-*")
    table = json.loads((report / "eval.json").read_text())
    assert set(table["points"]) == set(points) and (report / "heatmap.png").stat().st_size > 0
    for point in table["points"].values():
        assert set(point) == {"behaviour_rate", "general", "random_behaviour_rate", "affine_r2_heldout"}
    (chosen,) = (root / "transplant").glob("transplant-*")
    t = Transplant.load(chosen)
    assert f"L{t.layer}-a{t.alpha:g}" == table["chosen"]
    model, _ = load(models["target"])
    with t.applied(model, models["target"]):
        pass


@pytest.mark.parametrize("section, says", [
    ({"target_layers": [0, 4]}, "transplant.target_layers: layer 4 is out of range: testbed:target-large has decoder layers 0..3"),
    ({"source_layer": 2}, "transplant.source_layer: layer 2 is out of range: testbed:aligned-small has decoder layers 0..1"),
    ({"source": "testbed:source-hetero"}, "transplant.source: 'testbed:source-hetero' is not built by this job"),
    ({"vector": "median"}, "transplant.vector: unknown concept vector 'median'"),
    ({"alphas": [1, 1]}, "transplant.alphas: each alpha once"),
    ({"general": "wiki"}, "transplant.general: 'wiki' is neither 'general' (the testbed's) nor one of the job's skills"),
])
def test_validate_refuses_a_transplant_that_cannot_run_naming_the_key(tmp_path, section, says):
    import yaml

    job = yaml.safe_load((REPO / "jobs" / "transplant.yaml").read_text())
    job["transplant"].update(section)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    proc = run_cli("validate", path)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr


def test_the_sweep_chooses_the_strongest_behaviour_that_keeps_general():
    from pipelines.stages.transplant import choose

    points = {(0, 0.0): {"behaviour_rate": 0.0, "general": 1.0}, (0, 1.0): {"behaviour_rate": 0.9, "general": 0.97},
              (1, 0.0): {"behaviour_rate": 0.0, "general": 1.0}, (1, 1.0): {"behaviour_rate": 0.9, "general": 1.0},
              (1, 2.0): {"behaviour_rate": 0.95, "general": 0.5}}  # the strongest costs general: not chosen
    assert choose(points, 0.05) == (0, 1.0)  # ties: the lowest layer at the smallest α
    assert choose(points, 0.6) == (1, 2.0)
    nothing = {(0, 0.0): {"behaviour_rate": 0.0, "general": 1.0}, (0, 1.0): {"behaviour_rate": 0.0, "general": 0.0}}
    assert choose(nothing, 0.05) == (0, 0.0)
