"""Every YAML under recipes/configs/ loads into its stage's dataclasses, and shows its launch command."""

from pathlib import Path

import pytest

from finetune.config import config_class_for, load_yaml, stage_of

CONFIG_DIR = Path(__file__).resolve().parent.parent / "recipes" / "configs"
SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))


def test_configs_are_shipped():
    assert len(SHIPPED) >= 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    cfg = load_yaml(config_class_for(path), path)
    header = path.read_text().split("\n\n")[0]
    stage = stage_of(path)
    assert f"recipes/{stage}.py --config recipes/configs/{path.relative_to(CONFIG_DIR)}" in header
    assert cfg.model.name
