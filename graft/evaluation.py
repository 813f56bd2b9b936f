"""Exact-match accuracy by batched greedy generation: the yardstick every result in graftline uses.

Works on any causal LM and tokenizer. Prompts are left-padded and generated in batches; an answer is
correct when the generated text up to the first end-of-sequence token equals it exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64, *, samples: int = 0,
                     temperature: float = 1.0) -> list[str]:
    """Greedy completions of `prompts`, cut at the first eos, special tokens removed; with `samples`, that many completions
    per prompt sampled from the model's whole distribution at `temperature` (prompt by prompt: the first prompt's first)."""
    decoding = ({"do_sample": True, "num_return_sequences": samples, "temperature": temperature, "top_k": 0, "top_p": 1.0}
                if samples else {"do_sample": False})
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(model.device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                 **decoding)
            new = gen[:, enc["input_ids"].shape[1]:]
            for row in new.tolist():
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id)]
                outs.append(tokenizer.decode(row, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outs


def exact_match(model, tokenizer, rows: list[dict[str, str]], max_new_tokens: int, batch_size: int = 64) -> float:
    """Fraction of rows whose greedy completion equals `answer` exactly (0..1)."""
    if not rows:
        raise ValueError("exact_match needs at least one example")
    got = generate_answers(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size)
    return sum(g == r["answer"] for g, r in zip(got, rows)) / len(rows)


def behaviour_rate(model, tokenizer, prompts: list[str], shows: Callable[[str], bool], max_new_tokens: int,
                   batch_size: int = 64) -> float:
    """Fraction of prompts whose greedy completion shows a behaviour (a predicate on the text)."""
    if not prompts:
        raise ValueError("behaviour_rate needs at least one prompt")
    return sum(map(shows, generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size))) / len(prompts)
