"""Unit tests run in milliseconds: they build no model. Constructing any transformers model here fails the test with
where it belongs instead (tests/integration/, which has the tiny model), so the split holds by rule, not by habit."""

import pytest


class ModelInAUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def no_model(monkeypatch):
    from transformers.modeling_utils import PreTrainedModel

    def refuse(self, *args, **kwargs):
        raise ModelInAUnitTest(f"{type(self).__name__} built in a unit test: move the test to tests/integration/")

    # Every transformers model calls post_init() from its constructor, however it is built (from_pretrained, a
    # config, the tiny base).
    monkeypatch.setattr(PreTrainedModel, "post_init", refuse)
