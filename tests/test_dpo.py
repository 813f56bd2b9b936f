"""GraftLLM's optional DPO step: preference pairs, the loss, the reference log-probs, the objective in the training
loop, going on from an SFT adapter, and the `transfer-dpo` recipe's checks."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graft.data import collate, encode_examples
from graft.evaluation import generate_answers
from graft.preference import (answer_logps, dpo_loss, encode_pair, labelled_tokens, preference_pairs, rejected_answers,
                              sequence_logps)
from pipelines.cache import Ref, content_key
from pipelines.recipes import check_job
from pipelines.spec import SpecError, parse_job
from pipelines.training.deepspeed_config import build_deepspeed_config
from pipelines.training.modes import MODES
from pipelines.training.objectives import OBJECTIVES
from pipelines.training.trainer import TrainRequest
from tests.conftest import make_adapter, make_base

ROWS = [{"prompt": "r:abc=", "answer": "cba"}, {"prompt": "r:xy=", "answer": "yx"}, {"prompt": "r:q=", "answer": "q"}]


def test_pairs_are_the_prompts_the_target_answers_otherwise_with_their_extras():
    pairs = preference_pairs(ROWS, ["cba", "xx", ""], [{"n": 0}, {"n": 1}, {"n": 2}])
    assert pairs == [{"prompt": "r:xy=", "chosen": "yx", "rejected": "xx", "n": 1},
                     {"prompt": "r:q=", "chosen": "q", "rejected": "", "n": 2}]
    with pytest.raises(ValueError, match="3 rows, 2 answers"):
        preference_pairs(ROWS, ["a", "b"])


def test_the_rejected_answer_is_the_greedy_error_else_the_first_wrong_sample():
    chosen = ["cba", "yx", "q"]
    assert rejected_answers(chosen, ["cbb", "yx", "q"], [["cba"], ["yx", "xy", "y"], ["q", "q"]]) == ["cbb", "xy", "q"]


def test_sampled_answers_come_per_prompt_in_order_and_repeat_under_a_seed(tiny):
    _, model, tok = tiny
    prompts = [r["prompt"] for r in ROWS[:2]]
    torch.manual_seed(5)
    first = generate_answers(model, tok, prompts, 4, samples=3, temperature=2.0)
    torch.manual_seed(5)
    assert generate_answers(model, tok, prompts, 4, samples=3, temperature=2.0) == first
    assert len(first) == 6 and len(set(first)) > 1  # a random tiny model at temperature 2 does not repeat itself
    greedy = generate_answers(model, tok, prompts, 4)  # near temperature 0 every sample is the greedy answer, in prompt order
    assert generate_answers(model, tok, prompts, 4, samples=3, temperature=1e-4) == [a for a in greedy for _ in range(3)]


def test_the_dpo_loss_is_log_two_at_the_reference_and_falls_as_the_chosen_answer_gains():
    ref_c, ref_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    at_ref = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1)
    assert at_ref.loss.item() == pytest.approx(math.log(2)) and at_ref.accuracy == 0.0 and at_ref.margin == 0.0
    better = dpo_loss(ref_c + 2.0, ref_r - 1.0, ref_c, ref_r, beta=0.5)  # margin 0.5 · 3 = 1.5 on both pairs
    assert better.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    assert better.accuracy == 1.0 and better.margin == pytest.approx(1.5)


def test_the_nll_weight_adds_the_chosen_answers_per_token_nll_to_the_dpo_loss():
    ref_c, ref_r = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    tokens = torch.tensor([3, 5])
    plain = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1).loss.item()
    rpo = dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1, nll_weight=0.5, chosen_tokens=tokens)
    assert rpo.loss.item() == pytest.approx(plain + 0.5 * (3 / 3 + 5 / 5) / 2)  # per-token NLL 1.0 on both pairs
    assert rpo.margin == 0.0  # the margins are DPO's alone
    with pytest.raises(ValueError, match="nll_weight > 0 needs chosen_tokens"):
        dpo_loss(ref_c, ref_r, ref_c, ref_r, beta=0.1, nll_weight=1.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = make_base(tmp_path_factory.mktemp("dpo") / "base")
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True)
    return base, model, AutoTokenizer.from_pretrained(str(base))


def test_sequence_logps_sum_the_answer_tokens_the_model_loss_averages(tiny):
    _, model, tok = tiny
    (example,) = encode_examples(tok, ROWS[:1], 64)
    batch = collate([example], tok.pad_token_id)
    out = model(**batch)
    answer_tokens = sum(1 for t in example[1] if t != -100) - (example[1][0] != -100)  # the first label is never predicted
    assert sequence_logps(out.logits, batch["labels"]).item() == pytest.approx(-out.loss.item() * answer_tokens, rel=1e-5)


def test_the_loop_scores_pairs_as_the_reference_was_scored(tiny):
    """The stage's reference log-probs and the loop's policy log-probs tokenize alike: at the reference the loss is log 2."""
    _, model, tok = tiny
    chosen, rejected = ["cba", "yx", "q"], ["abc", "", "qq"]
    prompts = [r["prompt"] for r in ROWS]
    ref_c, ref_r = answer_logps(model, tok, prompts, chosen, 64, 2), answer_logps(model, tok, prompts, rejected, 64, 2)
    rows = [{"prompt": p, "chosen": c, "rejected": r, "ref_chosen": a, "ref_rejected": b}
            for p, c, r, a, b in zip(prompts, chosen, rejected, ref_c, ref_r)]
    req = _request(objective="dpo", objective_settings={"beta": 0.2})
    dpo = OBJECTIVES["dpo"]
    examples = dpo.encode(tok, rows, req)
    assert examples[0][:2] == encode_pair(tok, rows[0], 64)
    model.eval()
    assert dpo.loss(model, examples, tok.pad_token_id, req).item() == pytest.approx(math.log(2), abs=1e-5)
    chosen_sft = collate(encode_examples(tok, [{"prompt": p, "answer": c} for p, c in zip(prompts, chosen)], 64), tok.pad_token_id)
    per_token = -(sequence_logps(model(**chosen_sft).logits, chosen_sft["labels"]) / labelled_tokens(chosen_sft["labels"]))
    rpo = replace(req, objective_settings={"beta": 0.2, "nll_weight": 2.0})
    assert dpo.loss(model, examples, tok.pad_token_id, rpo).item() == pytest.approx(math.log(2) + 2.0 * per_token.mean().item(),
                                                                                   abs=1e-4)
    with pytest.raises(ValueError, match="pair 1 needs numbers 'ref_chosen' and 'ref_rejected'"):
        dpo.encode(tok, [rows[0], {k: v for k, v in rows[1].items() if k != "ref_rejected"}], req)


def _request(**changes) -> TrainRequest:
    ds = build_deepspeed_config(micro_batch_size=2, lr=1e-3, steps=2, warmup_steps=0, zero_stage=2, grad_clip=1.0, bf16=False,
                                offload_optimizer=False)
    req = TrainRequest(model=Ref("/m", "m"), tokenizer=Ref("/m", "m"), data=Ref("/d", "d"), mode="full", steps=2, batch_size=2,
                       seed=0, deepspeed=ds, max_length=64)
    return replace(req, **changes)


def test_a_request_at_the_default_objective_keeps_the_key_it_had_before_objectives_existed():
    req = _request()
    before = {"type": "TrainRequest", **{k: v for k, v in req.__dict__.items() if k not in ("objective", "objective_settings")}}
    assert req.key() == content_key(before)
    dpo = {beta: _request(objective="dpo", objective_settings={"beta": beta}).key() for beta in (0.1, 0.2)}
    assert len({req.key(), *dpo.values()}) == 3


@pytest.mark.parametrize("changes, message", [
    ({"objective": "ppo"}, "training objective must be one of"),
    ({"objective": "dpo"}, "objective 'dpo' needs objective_settings \\['beta'\\]"),
    ({"objective": "dpo", "objective_settings": {"beta": 0.1}, "replay": Ref("/r", "r"), "replay_fraction": 0.2},
     "objective 'dpo' takes no replay data"),
])
def test_a_request_the_objective_cannot_run_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        _request(**changes)


def test_lora_training_goes_on_from_an_earlier_adapter_trainable(tiny, tmp_path):
    base, _, tok = tiny
    adapter = make_adapter(base, tmp_path / "sft", rank=4)
    model = AutoModelForCausalLM.from_pretrained(str(base), use_safetensors=True)
    req = _request(mode="lora", adapter={"rank": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj"],
                                         "init": Ref(str(adapter), "sft")})
    wrapped = MODES["lora"].wrap(model, req, tok)
    trainable = {n: p for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert next(p for n, p in trainable.items() if "lora_A" in n).shape[0] == 4  # the SFT adapter's rank, not a fresh r=8
    assert any(("v_proj" in n) for n in trainable)  # its own target modules
    assert any(p.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)  # its trained weights, not a fresh init


def _job(**sections):
    return parse_job({"name": "t", "recipe": "transfer-dpo", "skills": [{"name": "reverse"}],
                      "testbed": {"models": ["base-v1", "source-hetero"]}, **sections}, "job.yaml")


def test_the_transfer_dpo_job_validates_and_only_its_recipe_may_set_dpo():
    assert check_job(_job(dpo={"beta": 0.2}), "job.yaml").stages[3] == "dpo"
    with pytest.raises(SpecError, match="job.yaml: train.method: 'sparse' experts cannot be trained on with dpo"):
        check_job(_job(train={"method": "sparse"}), "job.yaml")
    plain = parse_job({"name": "t", "recipe": "transfer", "skills": [{"name": "reverse"}],
                       "testbed": {"models": ["base-v1", "source-hetero"]}, "dpo": {"beta": 0.2}}, "job.yaml")
    with pytest.raises(SpecError, match="job.yaml: dpo: not used by recipe 'transfer'"):
        check_job(plain, "job.yaml")
    with pytest.raises(SpecError, match="dpo.beta"):
        _job(dpo={"beta": 0})
    with pytest.raises(SpecError, match="dpo.nll_weight"):
        _job(dpo={"nll_weight": -1})
    for section in ("train", "dpo"):  # DeepSpeed's schedule refuses 0 warmup steps mid-run: refused before anything runs
        with pytest.raises(SpecError, match=f"job.yaml: {section}.warmup_steps"):
            _job(**{section: {"warmup_steps": 0}})


def test_dpo_trains_at_most_its_epochs_over_the_pairs_and_warms_up_within_them():
    from pipelines.spec import DpoSpec
    from pipelines.stages.dpo import capped_schedule

    d = DpoSpec(steps=200, epochs=3, batch_size=16, warmup_steps=10)
    assert capped_schedule(d, 41, workers=2) == (4, 1)  # 3 passes over 41 pairs at 32 a step: ceil(3.84)
    assert capped_schedule(d, 1000, workers=2) == (94, 9)
    assert capped_schedule(d, 5000, workers=2) == (200, 10)  # the pairs outlast `steps`: the section's schedule
    assert capped_schedule(d.model_copy(update={"epochs": None}), 41, workers=2) == (200, 10)
