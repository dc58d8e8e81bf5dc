"""A tiny Hugging Face model folder (model + tokenizer built in code) for CLI tests."""

from __future__ import annotations

from pathlib import Path

from tiny_models import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "the a news of and to in was said on for at by with from that police government new year".split()


def save_tiny_hf_model(folder: Path) -> Path:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    model = tiny_llama()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def write_text(path: Path, n_words: int = 3000) -> Path:
    words = [WORDS[(i * 7 + i // 5) % len(WORDS)] for i in range(n_words)]
    path.write_text(" ".join(words))
    return path
