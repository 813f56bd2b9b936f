"""Preference pairs and the DPO loss (GraftLLM's optional DPO step after SFT, methods.md §1.1).

After the target has learned a skill from a source's answers by SFT, the answers it still gets wrong
make preference pairs: the source's checked answer is *chosen*, the target's own answer *rejected*. Where its
greedy answer is already right, an answer sampled from it that is not right is rejected instead (`rejected_answers`),
so DPO also takes probability from the wrong answers it would still give.
DPO (Rafailov et al., 2023) then raises the chosen answer's likelihood against the rejected one's,
relative to a frozen reference — here the SFT model itself, whose log-probabilities are computed once
when the pairs are made (`answer_logps`) and stored with them, so training needs no second model.

Log-probabilities are summed over the answer's tokens and its eos, tokenized exactly as training does
(`graft.data.encode_examples`), so the reference and the policy score the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from graft.data import encode_examples, labelled_batches


def rejected_answers(chosen: list[str], greedy: list[str], sampled: list[list[str]]) -> list[str]:
    """Per prompt, the target's answer to reject: its greedy answer where that is not the chosen one, else the first
    of its sampled answers that is not (else the chosen answer itself: the prompt makes no pair)."""
    if not len(chosen) == len(greedy) == len(sampled):
        raise ValueError(f"{len(chosen)} chosen, {len(greedy)} greedy and {len(sampled)} sampled answer lists")
    return [g if g != c else next((a for a in alts if a != c), c) for c, g, alts in zip(chosen, greedy, sampled)]


def preference_pairs(rows: list[dict[str, str]], answers: list[str], extras: list[dict] | None = None) -> list[dict]:
    """`{"prompt", "chosen", "rejected"}` for each row whose `answer` (the source's) differs from the target's, with
    that row's `extras` (e.g. its reference log-probs) added."""
    extras = extras if extras is not None else [{}] * len(rows)
    if not len(rows) == len(answers) == len(extras):
        raise ValueError(f"{len(rows)} rows, {len(answers)} answers and {len(extras)} extras")
    return [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": a, **x}
            for r, a, x in zip(rows, answers, extras) if a != r["answer"]]


def labelled_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, how many tokens `sequence_logps` sums over (the predicted labelled ones)."""
    return (labels[:, 1:] != -100).sum(-1)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the summed log-probability of its labelled tokens (labels -100 carry none), next-token aligned."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != -100
    picked = torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def encode_pair(tokenizer, row: dict[str, str], max_length: int) -> tuple:
    """A pair as training encodes it: (chosen ids, chosen labels), (rejected ids, rejected labels)."""
    chosen, rejected = encode_examples(tokenizer, [{"prompt": row["prompt"], "answer": row["chosen"]},
                                                   {"prompt": row["prompt"], "answer": row["rejected"]}], max_length)
    return chosen, rejected


@torch.no_grad()
def answer_logps(model, tokenizer, prompts: list[str], answers: list[str], max_length: int, batch_size: int = 32) -> list[float]:
    """The model's summed log-probability of each answer (and its eos) after its prompt."""
    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for batch in labelled_batches(tokenizer, [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)], max_length,
                                      batch_size):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            out += sequence_logps(logits, batch["labels"]).tolist()
    finally:
        model.train(was_training)
    return out


@dataclass(frozen=True)
class DpoLoss:
    """One batch's DPO loss, and how often (and by how much) the policy already prefers the chosen answer."""

    loss: torch.Tensor
    margins: torch.Tensor  # per pair: β × (chosen's log-ratio − rejected's), detached

    @property
    def accuracy(self) -> float:
        """Share of pairs whose implicit reward ranks chosen above rejected."""
        return (self.margins > 0).float().mean().item()

    @property
    def margin(self) -> float:
        """Mean reward margin, in nats × β."""
        return self.margins.mean().item()


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float, nll_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None) -> DpoLoss:
    """−log σ(β[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))]), averaged over the pairs.

    With `nll_weight` α > 0, α × the chosen answers' per-token negative log-likelihood is added (RPO, Pang et al. 2024;
    TRL's `rpo_alpha`): plain DPO only widens the margin, and may do so by lowering the chosen answer's likelihood too,
    so the greedy answer can drift to a third one. `chosen_tokens` (the labelled tokens of each chosen answer) is then
    needed to make the sums per-token.
    """
    margins = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -F.logsigmoid(margins).mean()
    if nll_weight:
        if chosen_tokens is None:
            raise ValueError("dpo_loss: nll_weight > 0 needs chosen_tokens")
        loss = loss + nll_weight * (-(policy_chosen / chosen_tokens.clamp(min=1)).mean())
    return DpoLoss(loss, margins.detach())  # the statistics are read on demand, off the training step
