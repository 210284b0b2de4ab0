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
