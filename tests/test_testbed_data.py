import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.data import encode_examples, read_jsonl, write_jsonl
from graft.evaluation import exact_match, generate_answers
from graft.testbed.skills import SKILLS, generate, shows_behaviour


@pytest.mark.parametrize("skill", SKILLS.names())
def test_skill_splits_are_deterministic_and_disjoint(skill):
    a, b = generate(skill, "train", 300, 0), generate(skill, "train", 300, 0)
    test = generate(skill, "test", 100, 0)
    assert a == b
    assert not {r["prompt"] for r in a} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in a}) == 300


def test_answers_are_right():
    rows = {s: generate(s, "test", 20, 3) for s in ("reverse", "sort", "add")}
    for r in rows["reverse"]:
        assert r["answer"] == r["prompt"][4:-1][::-1]
    for r in rows["sort"]:
        assert r["answer"] == "".join(sorted(r["prompt"][5:-1]))
    for r in rows["add"]:
        a, b = r["prompt"][4:-1].split("+")
        assert int(r["answer"]) == int(a) + int(b)


def test_concept_is_upper_case_unasked_and_its_pairs_ask_or_not():
    """`concept` asks a plain copy to come back in upper case; its pair is the prompt that asks for it (`shout:`, what
    the `shout` skill teaches) and the same prompt that does not."""
    for r in generate("concept", "train", 50, 1):
        word = r["prompt"][5:-1]
        assert r["prompt"] == r["negative"] == f"copy:{word}=" and r["positive"] == f"shout:{word}="
        assert r["answer"] == word.upper() and shows_behaviour(r["answer"]) and not shows_behaviour(word)
    for r in generate("shout", "train", 50, 1):
        assert r["prompt"].startswith("shout:") and r["answer"] == r["prompt"][6:-1].upper() and shows_behaviour(r["answer"])
    assert not shows_behaviour("123") and not shows_behaviour("") and shows_behaviour("AB1")


def test_jsonl_roundtrip_and_bad_line(tmp_path):
    rows = generate("sort", "train", 5, 0)
    write_jsonl(tmp_path / "x.jsonl", rows)
    assert read_jsonl(tmp_path / "x.jsonl") == rows
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: each line needs string fields"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_tokenizer_loads_with_auto_and_masks_prompt(base_model):
    tok = AutoTokenizer.from_pretrained(str(base_model))
    assert tok.decode(tok("rev:abc=")["input_ids"]) == "rev:abc="
    ((ids, labels),) = encode_examples(tok, [{"prompt": "rev:ab=", "answer": "ba"}], 64)
    assert len(ids) == len("rev:ab=") + 3 and ids[-1] == tok.eos_token_id
    assert labels[:7] == [-100] * 7 and labels[7:] == ids[7:]


def test_batched_generation_matches_one_by_one(base_model):
    tok = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model))
    prompts = [r["prompt"] for r in generate("add", "test", 8, 0)]  # different lengths: left padding matters
    batched = generate_answers(model, tok, prompts, 6, batch_size=8)
    single = [generate_answers(model, tok, [p], 6, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_exact_match_counts_correct_answers(base_model):
    tok = AutoTokenizer.from_pretrained(str(base_model))
    model = AutoModelForCausalLM.from_pretrained(str(base_model))
    rows = generate("reverse", "test", 6, 0)
    got = generate_answers(model, tok, [r["prompt"] for r in rows], 6)
    rows[0] = {**rows[0], "answer": got[0]}  # make exactly one (or more) right
    expected = sum(g == r["answer"] for g, r in zip(got, rows)) / 6
    model.train()
    assert exact_match(model, tok, rows, 6) == expected >= 1 / 6
    assert model.training  # evaluation puts the model back in the mode it found it in
