"""Resolving and loading base models, tokenizers and adapters."""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_NAME, tiny_model_dir


def resolve_model(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts: ``tiny`` -> the embedded model's directory,
    a local directory -> itself, anything else -> a hub id (used as is)."""
    if name_or_path == TINY_NAME:
        return str(tiny_model_dir())
    return str(Path(name_or_path)) if Path(name_or_path).exists() else name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model name, directory or hub id, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        # Llama 2/3 ship without one; reuse EOS for padding (padded positions are masked out of every loss).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
