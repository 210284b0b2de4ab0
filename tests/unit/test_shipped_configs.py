"""Every YAML under recipes/configs/ loads into its stage's dataclasses, and shows its launch command."""

from pathlib import Path

import pytest

from finetune.config import STAGE_CONFIGS, config_class_for, load_yaml, parse_args, stage_of, to_dict

CONFIG_DIR = Path(__file__).resolve().parents[2] / "recipes" / "configs"
SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    cfg = load_yaml(config_class_for(path), path)
    header = path.read_text().split("\n\n")[0]
    stage = stage_of(path)
    assert f"recipes/{stage}.py --config recipes/configs/{path.relative_to(CONFIG_DIR)}" in header
    if stage == "pipeline":  # a pipeline names stage configs: each loads with the pipeline's overrides
        from finetune.pipeline import check_stage_configs

        check_stage_configs(cfg, Path("runs/pipeline"))
    else:
        assert cfg.model.name


# Each stage's bare command (README) and the tiny YAML whose results it must give: the defaults are those values.
BARE_AND_TINY = [
    ("sft", [], "tiny/sft_lora.yaml"),
    ("reward", ["--init", "runs/sft"], "tiny/reward_lora.yaml"),
    ("rejection_sampling", ["--init", "runs/sft"], "tiny/rejection_sampling.yaml"),
    ("dpo", ["--init", "runs/sft"], "tiny/dpo_lora.yaml"),
    ("kto", ["--init", "runs/sft"], "tiny/kto_lora.yaml"),
    ("ppo", ["--init", "runs/sft"], "tiny/ppo_lora.yaml"),
    ("grpo", ["--init", "runs/sft"], "tiny/grpo_lora.yaml"),
    ("rloo", ["--init", "runs/sft"], "tiny/rloo_lora.yaml"),
    ("pipeline", [], "tiny/pipeline.yaml"),
]


@pytest.mark.parametrize("stage, argv, tiny", BARE_AND_TINY, ids=[stage for stage, _, _ in BARE_AND_TINY])
def test_bare_config_is_the_shipped_tiny_config(stage, argv, tiny):
    bare = to_dict(parse_args(STAGE_CONFIGS[stage], argv))
    shipped = to_dict(load_yaml(STAGE_CONFIGS[stage], CONFIG_DIR / tiny))
    differences = {key: (bare[key], shipped[key]) for key in bare if bare[key] != shipped[key]}
    assert not differences, f"bare recipes/{stage}.py {' '.join(argv)} differs from {tiny}: {differences}"


def test_real_configs_name_no_verifier():
    """Only the bundled suite has a verifier; `auto` (the default) finds none for other data, so a real config says
    nothing about verifiers."""
    for path in SHIPPED:
        if path.parent.name != "tiny":
            cfg = load_yaml(config_class_for(path), path)
            assert getattr(getattr(cfg, "eval", None), "verifier", None) is None, path
            assert getattr(getattr(cfg, "score", None), "verifier", None) is None, path
            assert "verifier" not in path.read_text(), path


def test_real_pipeline_configs_take_none_of_the_tiny_pipelines_stage_overrides():
    """The stage sections' defaults are the tiny pipeline's (a seed set for SFT, cooler sampling, DPO's NLL weight and
    rejected replies cut at their first difference, for word lists): a real pipeline
    config starts from its own SFT run and names its own stage configs and settings."""
    from finetune.config import PipelineDPOStage, PipelineRejectionStage, PipelineSFTStage

    tiny_only = {*PipelineSFTStage().overrides, *PipelineRejectionStage().overrides, *PipelineDPOStage().overrides}
    for path in SHIPPED:
        if path.parent.name != "tiny" and stage_of(path) == "pipeline":
            cfg = load_yaml(config_class_for(path), path)
            assert cfg.init, path  # the sft section (tiny by default) is not used
            for stage in (cfg.rejection_sampling, cfg.dpo, cfg.ppo, cfg.reward):
                assert "/tiny/" not in stage.config and not tiny_only & set(stage.overrides), (path, stage)
