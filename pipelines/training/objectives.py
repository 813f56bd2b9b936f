"""Training objectives by name: what a training row is and the loss a batch of them gives.

`sft` is next-token cross-entropy on each `{"prompt", "answer"}` row's loss span (the loop's default,
with replay mixed in). `dpo` reads `{"prompt", "chosen", "rejected", "ref_chosen", "ref_rejected"}` pairs
(`graft.preference`: the reference log-probabilities were computed when the pairs were made, so no
reference model runs here) and takes the DPO loss with `beta` (and, where set, `nll_weight`: the chosen answers' NLL
added, RPO) from the request's `objective_settings`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Encode = Callable[[Any, list[dict], Any], list]  # (tokenizer, this rank's rows, TrainRequest) -> the examples a pool serves
Loss = Callable[[Any, list, int, Any], Any]  # (engine, a batch of examples, pad id, TrainRequest) -> the loss tensor


@dataclass(frozen=True)
class Objective:
    fields: tuple[str, ...]  # the string fields every row of the training data needs
    encode: Encode
    loss: Loss
    takes_replay: bool  # whether `replay` rows (prompt/answer, next-token loss) may be mixed into its batches
    settings: tuple[str, ...] = ()  # the keys `objective_settings` must hold


def _sft_encode(tok, rows: list[dict], req) -> list:
    from graft.data import encode_examples

    return encode_examples(tok, rows, req.max_length, req.loss_on)


def _sft_loss(engine, examples: list, pad_id: int, req):
    from graft.data import collate

    return engine(**{k: v.to(engine.device) for k, v in collate(examples, pad_id).items()}).loss


def _dpo_encode(tok, rows: list[dict], req) -> list:
    from graft.preference import encode_pair

    out = []
    for i, row in enumerate(rows):
        refs = [row.get("ref_chosen"), row.get("ref_rejected")]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in refs):
            raise ValueError(f"{req.data.path}: pair {i} needs numbers 'ref_chosen' and 'ref_rejected' (the reference log-probs)")
        out.append((*encode_pair(tok, row, req.max_length), float(refs[0]), float(refs[1])))
    return out


def _dpo_loss(engine, examples: list, pad_id: int, req):
    import torch

    from graft.data import collate
    from graft.preference import dpo_loss, labelled_tokens, sequence_logps

    n = len(examples)
    batch = {k: v.to(engine.device) for k, v in collate([e[0] for e in examples] + [e[1] for e in examples], pad_id).items()}
    logps = sequence_logps(engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"])
    ref = torch.tensor([[e[2] for e in examples], [e[3] for e in examples]], device=logps.device)
    settings = req.objective_settings
    return dpo_loss(logps[:n], logps[n:], ref[0], ref[1], settings["beta"], nll_weight=settings.get("nll_weight", 0.0),
                    chosen_tokens=labelled_tokens(batch["labels"][:n])).loss


OBJECTIVES: dict[str, Objective] = {
    "sft": Objective(("prompt", "answer"), _sft_encode, _sft_loss, takes_replay=True),
    "dpo": Objective(("prompt", "chosen", "rejected"), _dpo_encode, _dpo_loss, takes_replay=False, settings=("beta",)),
}
