"""Shared test set-up: offline, CPU, and the `gpu` marker skipped where there is no CUDA device."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tokenizer():
    """The tiny model's tokenizer, once per test module (a test may set its chat template)."""
    from finetune.models import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def rows(tokenizer):
    """Five bundled suite conversations of different lengths, tokenised with the llama3 template (``input_ids`` and
    ``labels``), for the packed-equals-padded tests."""
    from finetune.data import load_conversations, tokenize_conversations
    from finetune.templates import get_template

    conversations = load_conversations("bundled:suite_messages_train.jsonl", limit=5)
    rows, report = tokenize_conversations(conversations, get_template("llama3", tokenizer), tokenizer, 256)
    assert report.kept == 5
    return rows
