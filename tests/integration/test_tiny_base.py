"""The shipped tiny base (finetune/tiny_base/) itself."""

import json

import pytest


def test_shipped_tiny_base_knows_the_tasks_it_was_pretrained_on():
    # The shipped base is what every accuracy figure in the README starts from; a weaker one (the first, 4-epoch
    # base answered 9%) would silently cap every stage. Its own metadata records the same figure per epoch.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tiny import TINY_VERSION, plain_qa_accuracy, tiny_model_dir

    directory = tiny_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    overall, per_family = plain_qa_accuracy(AutoModelForCausalLM.from_pretrained(directory), tokenizer)
    info = json.loads((directory / "finetune_tiny.json").read_text())
    assert info["version"] == TINY_VERSION
    assert overall >= 0.8, per_family
    assert overall == pytest.approx(info["pretrain_plain_qa_accuracy"][-1]["overall"], abs=0.005)
    assert per_family["reverse"] >= 0.95 and per_family["capital"] == 1.0
