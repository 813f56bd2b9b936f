"""A character-level tokenizer for the synthetic testbed, saved in HF format.

Every character of the testbed's alphabet is one token, so skills such as reversing or sorting a
string are learnable by tiny models. Built with `tokenizers` and wrapped as a
`PreTrainedTokenizerFast`, so `AutoTokenizer.from_pretrained(folder)` loads it like any HF tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits + " +-=:;,.[]()<>|*#!?'"


def build_char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """Return a fast tokenizer with one token per character of `alphabet` plus pad/bos/eos/unk."""
    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in dict.fromkeys(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, padding_side="left", pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    return tok


def save_char_tokenizer(folder: str | Path, alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    tok = build_char_tokenizer(alphabet)
    tok.save_pretrained(str(folder))
    return tok
