"""Running a recipe in the test's own process (``recipes/NAME.py``'s ``main`` through ``finetune.launch.launch``,
exit status and one-line errors included), and what every stage's run directory must hold."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.launch import launch

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The run directory contract shared by SFT, reward and DPO (README, "What a run leaves in its output directory").
RUN_DIRECTORY_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "adapter_model.safetensors",
                       "adapter_config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                       "loss.png")


def recipe_module(name: str):
    """``recipes/NAME.py`` imported as a module (the recipes folder is not a package)."""
    sys.path.insert(0, str(RECIPES))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def run_recipe(name: str, config_class, argv: list[str]) -> int:
    """``recipes/NAME.py ARGV`` in this process; its exit status (2 for a user's mistake)."""
    return launch(config_class, recipe_module(name).main, argv)


def assert_run_directory(out: Path) -> None:
    """``out`` holds every file of the run directory contract and TensorBoard events."""
    for name in RUN_DIRECTORY_FILES:
        assert (out / name).is_file(), name
    assert list(out.glob("runs/*/events.out.tfevents.*")), "TensorBoard events"
