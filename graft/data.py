"""Prompt/answer datasets: JSONL I/O and tokenization for causal-LM training and scoring.

The one data format graftline reads is JSONL with two string fields, `prompt` and `answer`, so a
user's own data drops in wherever a testbed skill would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from graft.atomic import atomic_write_text


def write_jsonl(path: str | Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: str | Path, fields: tuple[str, ...] = ("prompt", "answer")) -> list[dict[str, str]]:
    """Read rows with string `fields` (prompt/answer by default; other fields kept); a malformed line is an error
    naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in fields):
                needs = " and ".join(repr(k) for k in fields)
                raise ValueError(f"{path}:{i}: each line needs " + (f"string fields {needs}" if fields else "a JSON object"))
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no examples")
    return rows


def split_holdout(rows: list[dict[str, str]], fraction: float = 0.1, most: int = 200) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(kept, held out) of a file's rows: the last `fraction` of them (at least one, at most `most`) held out, so a
    user's general-purpose file both trains (replay) and measures what training cost, without overlap."""
    if len(rows) < 2:
        raise ValueError(f"need at least 2 rows to hold some out, got {len(rows)}")
    n = max(1, min(most, int(len(rows) * fraction)))
    return rows[:-n], rows[-n:]


def encode_examples(
    tokenizer, rows: list[dict[str, str]], max_length: int, loss_on: str = "answer"
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels per example: prompt + answer + eos; labels -100 outside the loss span."""
    if loss_on not in ("answer", "all"):
        raise ValueError(f"loss_on must be 'answer' or 'all', got {loss_on!r}")
    prompts = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]  # one batched call: fast tokenizers
    answers = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]  # run it in Rust, in parallel
    out = []
    for p, a in zip(prompts, answers):
        a = a + [tokenizer.eos_token_id]
        ids = (p + a)[:max_length]
        labels = ([-100] * len(p) if loss_on == "answer" else list(p)) + a
        out.append((ids, labels[:max_length]))
    return out


def collated_batches(examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive collated batches of encoded examples, in order (for scoring and calibration passes)."""
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i:i + batch_size], pad_id)


def replay_mix(rows: list[dict[str, str]], replay: list[dict[str, str]], replay_fraction: float) -> list[dict[str, str]]:
    """`rows` plus the first replay rows, in the share of the whole a training batch gives replay."""
    return rows + replay[:round(len(rows) * replay_fraction / (1 - replay_fraction))]


def labelled_batches(tokenizer, rows: list[dict[str, str]], max_length: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Prompt/answer `rows` tokenized and collated in order, answers labelled (for scoring, calibration, grid tuning)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return list(collated_batches(encode_examples(tokenizer, rows, max_length), pad, batch_size))


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of (ids, labels) for training; padded positions carry no loss."""
    n = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
