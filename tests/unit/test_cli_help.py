"""``finetune --help`` and a recipe's ``--help``: every verb listed, the training stack never imported, nothing on
stderr, and help texts that say what the code does. (How fast they are is measured, not asserted: README, "The
command line".)"""

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import COMMANDS
from finetune.config import ModelConfig, SFTRunConfig, field_docs
from finetune.launch import STAGES

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.py"))
HEAVY = ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate")


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter from the checkout; it prints the heavy modules it ended up importing last."""
    tail = f"\nimport sys\nprint('IMPORTED', sorted(m for m in {HEAVY!r} if m in sys.modules))"
    return subprocess.run([sys.executable, "-c", code + tail], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_finetune_help_lists_every_verb_without_the_training_stack():
    result = run_python("from finetune.cli import main\nmain(['--help'])")
    assert result.returncode == 0 and result.stderr == ""
    for name in [*STAGES, *(command.name for command in COMMANDS)]:
        assert f"    {name}" in result.stdout, name
    assert result.stdout.rstrip().endswith("IMPORTED []")


@pytest.mark.parametrize("command", [command.name for command in COMMANDS if command.name not in STAGES])
def test_command_help_imports_no_training_stack(command):
    """``finetune chat --help`` took 1.7 s importing torch for its arguments; every verb's help now takes none."""
    code = (f"from finetune.cli import main\nstatus = main([{command!r}, '--help'])\n"
            "assert status == 0, status")
    result = run_python(code)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "usage: finetune " + command in result.stdout
    assert result.stdout.rstrip().endswith("IMPORTED []")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_help_imports_no_training_stack_and_warns_nothing(recipe):
    code = (f"import runpy, sys\nsys.argv = [{str(recipe)!r}, '--help']\n"
            f"try:\n    runpy.run_path({str(recipe)!r}, run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code")
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "Options (YAML keys, or --section.key=value)" in result.stdout
    assert result.stdout.rstrip().endswith("IMPORTED []")


def test_stage_help_shows_the_pass_through_and_the_trackers(capsys):
    from finetune.cli import main

    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "--trainer={}" in out and "--train.report_to=['tensorboard']" in out


def test_attention_help_says_what_auto_picks():
    """``auto`` without FlashAttention is ``sdpa_packed`` (``finetune.kernels.choose_attention``), and the help says so."""
    import torch

    from finetune.kernels import PACKED_SDPA, choose_attention

    assert choose_attention("auto", torch.float32, cuda=False).implementation == PACKED_SDPA == "sdpa_packed"
    assert choose_attention("auto", torch.bfloat16, cuda=True, capability=(8, 0)).implementation == PACKED_SDPA
    doc = field_docs(ModelConfig)["attn_implementation"]
    assert "else ``sdpa_packed``" in doc and "else ``sdpa``;" not in doc
    assert "pass-through" in field_docs(SFTRunConfig)["trainer"].lower()
