"""`--init` of a broken run directory on a real (tiny) SFT run: a one-line error, never a traceback."""

import json

import pytest

from finetune.config import ConfigError, SFTRunConfig


def test_a_corrupt_truncated_or_wrong_rank_adapter_is_a_one_line_init_error(tmp_path):
    import shutil

    from factories import make_sft_run

    from finetune.run_dir import ADAPTER_WEIGHTS, resolve_init

    def init_of(run):
        return resolve_init(SFTRunConfig(init=str(run), output_dir=str(tmp_path / "out")))

    good = make_sft_run(tmp_path / "good")
    assert init_of(good)[1].kind == "adapter"

    def copy_of_good(name):  # each copy is then broken in one way
        return shutil.copytree(good, tmp_path / name)

    truncated = copy_of_good("truncated")
    weights = truncated / ADAPTER_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ConfigError, match="cannot read adapter_model.safetensors"):
        init_of(truncated)
    wrong_rank = copy_of_good("rank")
    config = json.loads((wrong_rank / "adapter_config.json").read_text())
    (wrong_rank / "adapter_config.json").write_text(json.dumps({**config, "r": 4}))
    with pytest.raises(ConfigError, match="has rank 8 but adapter_config.json says r=4"):
        init_of(wrong_rank)
    corrupt = copy_of_good("corrupt")
    (corrupt / "adapter_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="adapter_config.json: cannot read it"):
        init_of(corrupt)


def test_an_init_adapter_saves_without_looking_up_tiny_on_the_hub(tmp_path, monkeypatch):
    """The saved adapter names its base ``tiny``; loaded as an ``--init``, its in-memory config names the directory
    the base came from, so each save of the continued adapter finds that config.json instead of asking the hub for a
    repository called ``tiny`` (offline: a warning on every checkpoint)."""
    import warnings

    import peft.utils.other
    from factories import make_sft_run
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from finetune.model_card import record_base_model
    from finetune.models import load_adapter, resolve_model

    run = make_sft_run(tmp_path / "sft")
    record_base_model(run, "tiny")  # as every finished run records it
    asked = []
    monkeypatch.setattr(peft.utils.other, "file_exists", lambda repo, name, **kw: asked.append(repo))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline, PEFT skips the lookup and warns instead
    model = load_adapter(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")), run, trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_peft_model_state_dict(model)
    assert asked == []
    assert model.peft_config["default"].base_model_name_or_path == resolve_model("tiny")
