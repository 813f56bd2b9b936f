"""Training modes by name: what a mode does to the loaded model before DeepSpeed takes it.

`full` trains every weight; `lora` wraps the model in a PEFT LoRA (a new one, or with `adapter["init"]`, a `Ref` to
the adapter folder an earlier training wrote, trainable again); `sparse` computes each target
module's mask on this rank (`graft.sparse`: every rank scores the same rows, so every rank gets the same
masks) and wraps the model in PEFT SHiRA, so it needs every weight whole on each rank (no sharded load under ZeRO-3).
An adapter mode's checkpoints leave out the frozen base, and
only its trainable tensors are gathered to save it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mode:
    wrap: Callable[[Any, Any, Any], Any] | None  # (model, TrainRequest, tokenizer) -> the model to train
    adapter: bool
    # `wrap` reads whole weight matrices (sparse masks are scored on them), so the model cannot be loaded sharded (ZeRO-3)
    needs_full_weights: bool = False


def _lora(model, req, tok):
    from peft import LoraConfig, get_peft_model

    from graft.lora import load_adapter

    s = req.adapter
    if s.get("init") is not None:  # go on training an adapter trained before (DPO after SFT): its own config, trainable
        return load_adapter(model, s["init"].path, trainable=True)
    return get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                            target_modules=list(s["target_modules"]), task_type="CAUSAL_LM"))


def _sparse(model, req, tok):
    from graft.data import collate, encode_examples, read_jsonl
    from graft.sparse import NEEDS_BATCHES, masks_for, shira_model

    s = req.adapter
    batches = []
    if s["rule"] in NEEDS_BATCHES:
        rows = encode_examples(tok, read_jsonl(req.data.path)[: s["score_batches"] * req.batch_size], req.max_length, req.loss_on)
        batches = [collate(rows[i:i + req.batch_size], tok.pad_token_id) for i in range(0, len(rows), req.batch_size)]
    r, masks = masks_for(model, s["target_modules"], s["rule"], s["keep_fraction"], batches, req.seed, s["match_lora_rank"])
    return shira_model(model, masks, r)


MODES: dict[str, Mode] = {"full": Mode(None, adapter=False), "lora": Mode(_lora, adapter=True),
                          "sparse": Mode(_sparse, adapter=True, needs_full_weights=True)}
