"""The test tree's own rules: every test module is under tests/unit or tests/integration, basenames are unique (test
scorers are imported by module name), and a unit test that builds a model fails."""

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_is_unit_or_integration_and_named_once():
    modules = sorted(TESTS.rglob("test_*.py"))
    assert modules
    assert [p for p in modules if p.parent.name not in ("unit", "integration")] == []
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_building_a_model_in_a_unit_test_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(AssertionError, match=r"Llama\w+ built in a unit test: move the test to tests/integration"):
        LlamaForCausalLM(config)
