"""Architectures of the testbed's tiny models, as HF configs, and their seeded initialisation.

Real Llama-family (and other families transformers ships) configs at toy sizes: the same code
paths that load, train, score and graft a 7B checkpoint run on these in seconds on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

SIZES: dict[str, dict] = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "mini": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256),
    "large": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, intermediate_size=512),
}


def model_config(family: str, size: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 max_positions: int = 64) -> PretrainedConfig:
    """An HF config for `family` ('llama', 'qwen2', 'gpt2') at one of the named `SIZES`."""
    if size not in SIZES:
        raise ValueError(f"unknown testbed size {size!r}; known: {', '.join(SIZES)}")
    s = SIZES[size]
    ids = dict(vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=s["hidden_size"], n_layer=s["num_hidden_layers"], n_head=s["num_attention_heads"],
            n_inner=s["intermediate_size"], n_positions=max_positions, **ids)
    if family not in ("llama", "qwen2"):
        raise ValueError(f"unknown testbed family {family!r}; known: llama, qwen2, gpt2")
    return AutoConfig.for_model(
        family, num_key_value_heads=s["num_attention_heads"], max_position_embeddings=max_positions,
        tie_word_embeddings=False, **s, **ids)


def init_model(config: PretrainedConfig, seed: int, folder: str | Path) -> None:
    """Write a freshly initialised model for `config` to `folder` (the start of pretraining)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
