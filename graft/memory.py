"""How much memory training or running a decoder LM takes: sizes counted on a model built on the meta device
(no weights), then plain arithmetic. Nothing here allocates a tensor; every number is bytes.

Why: a stage that cannot fit its node fails minutes or hours in, after Ray, DeepSpeed and the weights have
loaded. These estimates say before anything runs what each worker will hold, so a plan can refuse early.

- `ModelShape`: a model's parameter count, its largest single module (what ZeRO-3 gathers at once), its
  decoder dimensions and every matrix by module name (what LoRA or a sparse adapter can target).
- `zero_states`: parameters, gradients and optimizer states per worker under a ZeRO stage, for any split of
  trainable and frozen parameters (LoRA: a few trainable, the rest frozen). DeepSpeed's own estimators, for a full
  16-bit fine-tune, are called by `pipelines.plan` (this library never imports DeepSpeed).
- `training_activations`, `forward_activations`, `kv_cache`: what the data adds on top.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig

FP32 = 4
ADAM_STATES = 8  # AdamW's first and second moments, fp32 each


@dataclass(frozen=True)
class ModelShape:
    """The sizes of one causal LM that memory depends on.

    `matrices` holds (module name, rows, cols) of every module whose weight is a matrix (Linear, HF's Conv1D,
    Embedding): a LoRA of rank r on it trains r·(rows + cols) parameters whatever the orientation.
    """

    name: str
    params: int
    largest_layer: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    matrices: tuple[tuple[str, int, int], ...]

    def targeted(self, targets: Sequence[str]) -> list[tuple[str, int, int]]:
        """The matrices PEFT would adapt for `target_modules=targets`: a module whose name is a target or ends in `.target`."""
        return [m for m in self.matrices if any(m[0] == t or m[0].endswith("." + t) for t in targets)]

    def lora_params(self, targets: Sequence[str], rank: int) -> int:
        """Trainable parameters of a LoRA of `rank` on `targets`: Σ r·(in + out) over the matched matrices."""
        return sum(rank * (rows + cols) for _, rows, cols in self.targeted(targets))

    def target_entries(self, targets: Sequence[str]) -> int:
        """Weights in the matched matrices (what an adapter on them changes, and what importance is scored over)."""
        return sum(rows * cols for _, rows, cols in self.targeted(targets))


def shape_of_model(model: torch.nn.Module, name: str) -> ModelShape:
    """A `ModelShape` counted on `model` (an HF causal LM, on the meta device or not); tied weights count once.

    The largest layer is DeepSpeed's: the most parameters one module holds itself (not through its children).
    """
    import torch

    params = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    matrices = tuple((n, *m.weight.shape) for n, m in model.named_modules()
                     if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)
    text = model.config.get_text_config()
    heads = text.num_attention_heads
    return ModelShape(name=name, params=params, largest_layer=largest, layers=text.num_hidden_layers, hidden=text.hidden_size,
                      heads=heads, kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                      head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads, vocab=text.vocab_size,
                      matrices=matrices)


def shape_from_config(config: PretrainedConfig, name: str, trust_remote_code: bool = False) -> ModelShape:
    """The `ModelShape` of the model `config` describes, built on the meta device: exact counts, no weights, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return shape_of_model(model, name)


@dataclass(frozen=True)
class States:
    """Model states of one worker: on its device, and in host memory (optimizer or parameter offload)."""

    device: int
    host: int = 0


def zero_states(*, trainable: int, frozen: int, weight_bytes: int, mixed: bool, stage: int, world: int, largest_layer: int,
                offload_optimizer: bool = False, offload_params: bool = False) -> States:
    """Parameters, gradients and AdamW states of one of `world` data-parallel workers under ZeRO `stage`.

    Per trainable parameter: its weight and gradient in the training dtype (`weight_bytes`: 2 with bf16/fp16, else 4);
    with `mixed` precision an fp32 gradient copy and an fp32 master weight; at stage ≥ 1 an fp32 master copy in
    fp32 training too (DeepSpeed's ZeRO optimizer keeps its own flat partition); and Adam's two fp32 moments.
    Per frozen parameter (a LoRA's base): its weight only. What ZeRO partitions over the workers (÷ world):
    stage 1 the optimizer side (fp32 gradient copy, master, moments), stage 2 also the gradients, stage 3 also
    every weight, trainable or frozen, plus one gathered layer at a time (2·weight_bytes·largest_layer, DeepSpeed's
    allowance: the layer's weights and gradients). `offload_optimizer` moves the optimizer side to the host,
    `offload_params` (stage 3) the partitioned weights.
    """
    optimizer = (FP32 if mixed else 0) + (FP32 if mixed or stage >= 1 else 0) + ADAM_STATES
    weights = (trainable + frozen) * weight_bytes
    grads = trainable * weight_bytes
    opt = trainable * optimizer
    share = {"weights": weights / world if stage >= 3 else weights, "grads": grads / world if stage >= 2 else grads,
             "optimizer": opt / world if stage >= 1 else opt}
    host = 0.0
    if offload_optimizer:
        host += share.pop("optimizer")
    if offload_params and stage >= 3:
        host += share.pop("weights")
    gathered = 2 * weight_bytes * largest_layer if stage >= 3 else 0
    return States(device=int(sum(share.values()) + gathered), host=int(host))


def layer_activations(shape: ModelShape, batch: int, seq: int, act_bytes: int) -> int:
    """What one decoder layer keeps for its backward pass, without recomputation or tensor parallelism
    (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", eq. 2):
    s·b·h·(34 + 5·a·s/h) bytes with 16-bit activations, scaled by act_bytes/2. It counts a GPT block (4h MLP, the
    attention scores materialised); a fused attention kernel keeps less, a wider gated MLP a little more."""
    per_layer_16bit = seq * batch * shape.hidden * (34 + 5 * shape.heads * seq / shape.hidden)
    return int(per_layer_16bit * act_bytes / 2)


def logits_bytes(shape: ModelShape, batch: int, positions: int, act_bytes: int, backward: bool) -> int:
    """The LM head's output at `positions` per row in the activation dtype, its fp32 upcast for the loss, and with
    `backward` the fp32 gradient of it: with a 128k vocabulary these rival a layer's activations."""
    return batch * positions * shape.vocab * (act_bytes + FP32 + (FP32 if backward else 0))


def training_activations(shape: ModelShape, batch: int, seq: int, act_bytes: int) -> int:
    """Activations a training step (or a gradient, as importance scoring takes) holds at its peak: every layer's
    (`layer_activations`) plus the logits and their gradient."""
    return shape.layers * layer_activations(shape, batch, seq, act_bytes) + logits_bytes(shape, batch, seq, act_bytes, True)


def forward_activations(shape: ModelShape, batch: int, seq: int, act_bytes: int, logit_positions: int | None = None) -> int:
    """A forward pass without gradients frees each layer's intermediates before the next: about one layer's
    `layer_activations` at a time, plus the logits at `logit_positions` per row (default: every position)."""
    positions = seq if logit_positions is None else logit_positions
    return layer_activations(shape, batch, seq, act_bytes) + logits_bytes(shape, batch, positions, act_bytes, False)


def kv_cache(shape: ModelShape, batch: int, tokens: int, act_bytes: int) -> int:
    """Keys and values of every layer for `tokens` positions of `batch` rows: 2·layers·kv_heads·head_dim·b·t·bytes."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * batch * tokens * act_bytes
