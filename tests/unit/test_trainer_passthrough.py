"""The ``trainer`` pass-through section and ``report_to``: any field of the TRL trainer's own dataclass can be set,
checked before a run starts; a field one of ours already sets is refused, naming ours."""

import dataclasses
import warnings

import pytest

from finetune.config import (
    ConfigError,
    DPORunConfig,
    PPORunConfig,
    RejectionSamplingRunConfig,
    RewardRunConfig,
    SFTRunConfig,
    parse_args,
)
from finetune.trainer_config import FIXED, OUR_FIELDS, OVERRIDABLE, trainer_config


def sft_args(tmp_path, argv):
    from finetune.stages import sft

    cfg = parse_args(SFTRunConfig, argv)
    return sft.trl_arguments(cfg, tmp_path, has_eval=True)


def test_a_trainer_field_passes_through_from_the_command_line_and_yaml(tmp_path):
    args = sft_args(tmp_path, ["--trainer.save_strategy=epoch", "--trainer.eval_strategy=epoch",
                               "--trainer.push_to_hub=true", "--trainer.hub_model_id=me/tiny-sft"])
    assert (args.save_strategy, args.eval_strategy, args.push_to_hub, args.hub_model_id) == (
        "epoch", "epoch", True, "me/tiny-sft")
    config = tmp_path / "sft.yaml"
    config.write_text("trainer:\n  logging_first_step: true\n  dataloader_num_workers: 0\n")
    args = sft_args(tmp_path, ["--config", str(config)])
    assert args.logging_first_step is True and args.dataloader_num_workers == 0


def test_pass_through_reaches_every_trl_stage(tmp_path):
    from finetune.stages import dpo, reward

    cfg = parse_args(DPORunConfig, ["--init", "runs/sft", "--trainer.save_strategy=no"])
    assert dpo.trl_arguments(cfg, tmp_path, True).save_strategy == "no"
    cfg = parse_args(RewardRunConfig, ["--trainer.center_rewards_coefficient=0.01"])
    assert reward.trl_arguments(cfg, tmp_path, True).center_rewards_coefficient == 0.01
    cfg = parse_args(RejectionSamplingRunConfig, ["--init", "runs/sft", "--trainer.save_strategy=no"])
    from finetune.stages import sft
    from finetune.stages.rejection_sampling import sft_config

    assert sft.trl_arguments(sft_config(cfg, tmp_path), tmp_path, True).save_strategy == "no"  # YAML's no, as text


def test_pass_through_reaches_kto_orpo_and_simpo_and_is_checked_there(tmp_path):
    from finetune.config import KTORunConfig
    from finetune.stages import dpo, kto

    cfg = parse_args(KTORunConfig, ["--init", "runs/sft", "--trainer.save_strategy=no"])
    assert kto.trl_arguments(cfg, tmp_path, True).save_strategy == "no"
    for loss, config_name in (("orpo", "ORPOConfig"), ("simpo", "CPOConfig")):
        overrides = ["--dpo.nll_weight=1"] if loss == "orpo" else []
        cfg = parse_args(DPORunConfig, ["--init", "runs/sft", f"--dpo.loss={loss}", *overrides,
                                        "--trainer.save_strategy=no"])
        args = dpo.reference_free_arguments(cfg, tmp_path, True)
        assert (type(args).__name__, args.save_strategy) == (config_name, "no")
        cfg = parse_args(DPORunConfig, ["--init", "runs/sft", f"--dpo.loss={loss}", *overrides,
                                        "--trainer.save_stratgy=no"])
        with pytest.raises(ConfigError, match=f"not a field of trl.{config_name}; did you mean 'trainer.save_strategy'"):
            dpo.check(cfg)


@pytest.mark.parametrize("argv, message", [
    (["--trainer.save_stratgy=epoch"], "unknown config key 'trainer.save_stratgy': not a field of trl.SFTConfig; "
                                       "did you mean 'trainer.save_strategy'?"),
    (["--trainer.reprot_to=wandb"], "did you mean 'train.report_to'?"),
    (["--trainer.warmup_ratio=0.1"], "did you mean 'train.warmup_ratio'?"),
    (["--trainer.learning_rate=1e-4"], "trainer.learning_rate is set by train.learning_rate; set that instead"),
    (["--trainer.report_to=wandb"], "trainer.report_to is set by train.report_to"),
    (["--trainer.gradient_checkpointing=true"], "trainer.gradient_checkpointing is set by model.activation_checkpointing"),
    (["--trainer.bf16=true"], "trainer.bf16 is set by model.dtype"),
    (["--trainer.logging_nan_inf_filter=true"], "trainer.logging_nan_inf_filter is fixed by the toolkit"),
    (["--trainer.save_strategy=sometimes"], "trl.SFTConfig refused trainer.save_strategy='sometimes'"),
])
def test_bad_pass_through_keys_are_one_line_config_errors(tmp_path, argv, message):
    with pytest.raises(ConfigError) as error:
        sft_args(tmp_path, argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dpo_refuses_its_own_loss_fields_by_our_names(tmp_path):
    from finetune.stages import dpo

    cfg = parse_args(DPORunConfig, ["--init", "runs/sft", "--trainer.beta=0.5"])
    with pytest.raises(ConfigError, match="trainer.beta is set by dpo.beta"):
        dpo.trl_arguments(cfg, tmp_path, True)


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward"])
def test_every_field_we_set_is_named_fixed_or_overridable(tmp_path, stage, monkeypatch):
    """No trainer field we set falls to the generic refusal: each is mapped to our key, fixed with a reason, or a
    pinned default a pass-through may replace; and every mapped name is a real field of the trainer's dataclass."""
    import importlib

    module = importlib.import_module(f"finetune.stages.{stage}")
    seen = {}
    monkeypatch.setattr(module, "trainer_config", lambda cls, ours, passthrough: seen.update(cls=cls, ours=ours))
    config_class = {"sft": SFTRunConfig, "dpo": DPORunConfig, "reward": RewardRunConfig}[stage]
    module.trl_arguments(parse_args(config_class, ["--init", "runs/sft"] if stage == "dpo" else []), tmp_path, True)
    unexplained = set(seen["ours"]) - set(OUR_FIELDS) - set(FIXED) - OVERRIDABLE
    assert not unexplained
    fields = {f.name for f in dataclasses.fields(seen["cls"])}
    assert not {key for key in seen["ours"] if key not in fields}


def test_the_mapping_names_fields_of_the_trainers():
    from trl import DPOConfig, RewardConfig, SFTConfig

    fields = set().union(*({f.name for f in dataclasses.fields(c)} for c in (SFTConfig, DPOConfig, RewardConfig)))
    assert not (set(OUR_FIELDS) | set(FIXED) | OVERRIDABLE) - fields


def test_report_to_defaults_to_tensorboard_and_takes_any_transformers_tracker(tmp_path):
    assert sft_args(tmp_path, []).report_to == ["tensorboard"]
    assert parse_args(SFTRunConfig, ["--train.report_to=wandb,mlflow"]).train.report_to == ["wandb", "mlflow"]
    assert sft_args(tmp_path, ["--train.report_to=none"]).report_to == []  # transformers' spelling of none
    assert parse_args(PPORunConfig, ["--init", "runs/sft", "--ppo.report_to=trackio"]).ppo.report_to == ["trackio"]
    with pytest.raises(ConfigError, match="train.report_to must be one of .*got 'wandbb'"):
        parse_args(SFTRunConfig, ["--train.report_to=wandbb"])
    with pytest.raises(ConfigError, match="none reports to no tracker"):
        parse_args(SFTRunConfig, ["--train.report_to=none,wandb"])
    with pytest.raises(ConfigError, match="ppo.report_to must be one of tensorboard, wandb, mlflow, trackio, none"):
        parse_args(PPORunConfig, ["--init", "runs/sft", "--ppo.report_to=comet_ml"])


def test_a_tracker_that_is_not_installed_is_named_before_the_run(tmp_path, monkeypatch):
    import transformers.integrations.integration_utils as integrations

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed \(pip install 'finetune\[trackers\]'\)"):
        sft_args(tmp_path, ["--train.report_to=wandb"])
    from finetune.stages import ppo

    with pytest.raises(ConfigError, match=r"ppo.report_to: mlflow is not installed \(pip install mlflow\)"):
        ppo.check(parse_args(PPORunConfig, ["--init", "runs/sft", "--ppo.report_to=mlflow"]))


def test_building_the_trainer_arguments_warns_nothing(tmp_path):
    """transformers 5 renamed gradient_checkpointing; we pass the new names, so no FutureWarning on any run."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        args = sft_args(tmp_path, ["--model.activation_checkpointing=full"])
    assert args.activation_checkpointing is True and args.activation_checkpointing_kwargs == {"use_reentrant": False}


def test_trainer_config_checks_keys_without_the_stage(tmp_path):
    from trl import SFTConfig

    ours = {"output_dir": str(tmp_path), "use_cpu": True, "report_to": ["none"], "eval_strategy": "no",
            "activation_checkpointing": False}
    assert trainer_config(SFTConfig, ours, {"eval_strategy": "epoch"}).eval_strategy == "epoch"  # overridable
    with pytest.raises(ConfigError, match="trainer.use_cpu is fixed by the toolkit: chosen from the machine"):
        trainer_config(SFTConfig, ours, {"use_cpu": False})
