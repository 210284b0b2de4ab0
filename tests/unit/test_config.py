"""Config loading: YAML + --section.key=value overrides, typed checks, unknown keys rejected with a suggestion."""

import pytest

from finetune.config import ConfigError, SFTRunConfig, field_docs, parse_args, to_dict


def test_defaults_are_the_embedded_model():
    cfg = parse_args(SFTRunConfig, [])
    assert cfg.model.name == "tiny"
    assert cfg.adapter.method == "lora"
    assert cfg.adapter.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 2.0e-5\n  num_epochs: 3\nadapter:\n  method: qlora\n")
    cfg = parse_args(SFTRunConfig, ["--config", str(path), "--train.learning_rate=1e-4", "--output_dir", "x", "--resume"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)  # YAML reads "1e-4" as a string; the field type converts
    assert cfg.train.num_epochs == 3.0 and isinstance(cfg.train.num_epochs, float)
    assert cfg.adapter.method == "qlora"
    assert cfg.output_dir == "x" and cfg.resume is True


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rat'; did you mean 'learning_rate'"):
        parse_args(SFTRunConfig, ["--train.learning_rat=1"])
    path = tmp_path / "c.yaml"
    path.write_text("modle:\n  name: tiny\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'modle'; did you mean 'model'"):
        parse_args(SFTRunConfig, ["--config", str(path)])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.per_device_batch_size=abc", "train.per_device_batch_size: expected an integer"),
        ("--data.packing=maybe", "data.packing: expected true or false"),
        ("--adapter.method=dora", "adapter.method must be one of lora, qlora, full"),
        ("--train.warmup_ratio=1.5", "warmup_ratio must be in"),
        ("--train.save_steps=7", "must be a multiple of train.logging_steps"),
    ],
)
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(SFTRunConfig, [override])


def test_null_and_lists_from_the_command_line():
    cfg = parse_args(SFTRunConfig, ["--data.eval=null", "--adapter.target_modules=q_proj,v_proj"])
    assert cfg.data.eval is None
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(SFTRunConfig, ["--config", str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_args(SFTRunConfig, ["--config", str(bad)])


def test_every_field_has_a_docstring():
    from finetune.config import AdapterConfig, DataConfig, EvalConfig, ModelConfig, TrainConfig

    for cls in (ModelConfig, AdapterConfig, DataConfig, TrainConfig, EvalConfig, SFTRunConfig):
        docs = field_docs(cls)
        nested = {"model", "adapter", "data", "train", "eval"}
        missing = [f for f in cls.__dataclass_fields__ if f not in docs and f not in nested]
        assert not missing, f"{cls.__name__} fields without a docstring: {missing}"


def test_round_trip_through_yaml(tmp_path):
    import yaml

    cfg = parse_args(SFTRunConfig, ["--train.learning_rate=3e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert parse_args(SFTRunConfig, ["--config", str(path)]) == cfg


def test_every_field_of_every_stage_config_has_a_docstring():
    import dataclasses
    import typing

    from finetune.config import STAGE_CONFIGS

    def walk(cls):
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name])
            elif f.name not in docs:
                yield f"{cls.__name__}.{f.name}"

    missing = sorted({name for cls in STAGE_CONFIGS.values() for name in walk(cls)})
    assert not missing, missing


def test_check_choice_and_ranges_name_the_key():
    from finetune.config import check_at_least, check_choice, check_interval, check_positive

    with pytest.raises(ConfigError, match=r"^a.b must be x or y; got 'z'$"):
        check_choice("a.b", "z", ("x", "y"))
    with pytest.raises(ConfigError, match=r"^a.b must be >= 1 or null; got 0$"):
        check_at_least("a.b", 0, 1, optional=True)
    check_at_least("a.b", None, 1, optional=True)
    with pytest.raises(ConfigError, match=r"^a.b must be > 0; got nan$"):
        check_positive("a.b", float("nan"))
    with pytest.raises(ConfigError, match=r"^a.b must be in \[0.0, 1.0\); got 1.0$"):
        check_interval("a.b", 1.0, 0.0, 1.0, closed_high=False)


def test_unmatched_target_modules_follow_peft_suffix_rule():
    from finetune.config import unmatched_target_modules

    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"]
    assert unmatched_target_modules(["q_proj", "mlp.up_proj", "lm_head", "all-linear"], names) == []
    assert unmatched_target_modules(["proj", "q_prj", "layers.0.self_attn.q_proj"], names) == ["proj", "q_prj"]


def test_verifier_auto_follows_the_data():
    from finetune.config import PPORunConfig, RejectionSamplingRunConfig

    assert parse_args(SFTRunConfig, []).eval.verifier == "finetune.suite:verify"
    assert parse_args(SFTRunConfig, ["--data.eval=mine.jsonl"]).eval.verifier is None
    cfg = parse_args(PPORunConfig, ["--init", "runs/sft", "--data.eval=null", "--score.reward_model=runs/reward",
                                 "--data.train=mine.jsonl"])
    assert cfg.score.verifier is None and cfg.eval.verifier is None
    explicit = parse_args(RejectionSamplingRunConfig, ["--init", "runs/sft", "--score.verifier=my.mod:check"])
    assert explicit.score.verifier == "my.mod:check"
