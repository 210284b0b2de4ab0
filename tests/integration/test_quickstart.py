"""The quickstart chain, verbatim and in order: `make demo` is the first command, and each stage command after it
starts from the run the one before left (`--init runs/sft`), run from a fresh directory on a reduced budget (the
overrides only shorten; they do not change where anything is read or written)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The README's stage commands, in order (what a new user types after `make demo`).
QUICKSTART = [
    "accelerate launch recipes/sft.py",
    "accelerate launch recipes/reward.py --init runs/sft",
    "accelerate launch recipes/rejection_sampling.py --init runs/sft",
    "accelerate launch recipes/dpo.py --init runs/sft",
    "accelerate launch recipes/kto.py --init runs/sft",
    "accelerate launch recipes/ppo.py --init runs/sft",
    "accelerate launch recipes/grpo.py --init runs/sft",
    "accelerate launch recipes/rloo.py --init runs/sft",
]
EVAL = ["--data.max_eval_samples=4", "--eval.num_samples=4", "--eval.max_new_tokens=8"]
BUDGET = {
    "sft": ["--train.max_steps=4", "--data.max_train_samples=32", *EVAL],
    "reward": ["--train.max_steps=2", "--data.max_train_samples=16", "--data.max_eval_samples=4"],
    # A 4-step SFT answers nothing right: keep failed samples so the chain reaches the fine-tune.
    "rejection_sampling": ["--data.max_train_samples=8", "--sampling.num_samples=2", "--sampling.max_new_tokens=8",
                           "--rejection.keep_unverified=true", "--train.max_steps=2", *EVAL],
    "dpo": ["--train.max_steps=2", "--data.max_train_samples=16", *EVAL],
    "kto": ["--train.max_steps=2", "--data.max_train_samples=16", *EVAL],
    "ppo": ["--ppo.num_iterations=2", "--ppo.rollout_batch_size=4", "--ppo.mini_batch_size=4", "--ppo.ppo_epochs=1",
            *EVAL],
    "grpo": ["--grpo.num_iterations=2", "--grpo.rollout_batch_size=2", "--sampling.num_samples=2", *EVAL],
    "rloo": ["--grpo.num_iterations=2", "--grpo.rollout_batch_size=2", "--sampling.num_samples=2", *EVAL],
}
# Where each stage's bare run writes what the next one needs.
OUTPUTS = {"sft": "runs/sft", "reward": "runs/reward", "rejection_sampling": "runs/rejection_sampling/sft",
           "dpo": "runs/dpo", "kto": "runs/kto", "ppo": "runs/ppo", "grpo": "runs/grpo", "rloo": "runs/rloo"}


def stage_of(command: str) -> str:
    return re.search(r"recipes/(\w+)\.py", command).group(1)


def test_make_demo_is_the_first_command_and_writes_where_the_others_read():
    demo = re.search(r"^demo:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "recipes/sft.py" in demo and "--output_dir" not in demo, demo  # the default output: runs/sft
    for command in QUICKSTART[1:]:
        assert command.endswith("--init runs/sft")
    readme = (ROOT / "README.md").read_text()
    positions = [readme.find(command + " ") for command in QUICKSTART]
    assert -1 not in positions, "every quickstart command is in the README, verbatim"
    assert positions == sorted(positions), "and in this order"
    for command in QUICKSTART:  # each recipe's own docstring shows its quickstart command
        stage = stage_of(command)
        assert command in (ROOT / "recipes" / f"{stage}.py").read_text(), stage


def tree_digest(directory: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_quickstart_chain_runs_in_order_from_a_fresh_directory(tmp_path):
    """``make demo``'s SFT first, then every stage that starts from it, two at a time on the two cores (each only
    reads ``runs/sft``, and ``runs/sft`` is checked unchanged after them all, which running them one after another
    would also have shown)."""
    from concurrent.futures import ThreadPoolExecutor

    shutil.copytree(ROOT / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    accelerate = str(Path(sys.executable).with_name("accelerate"))

    def run(command: str) -> None:
        stage = stage_of(command)
        argv = [accelerate, *command.split()[1:], *BUDGET[stage]]
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        out = tmp_path / OUTPUTS[stage]
        assert (out / "adapter_model.safetensors").is_file(), (command, sorted(p.name for p in out.parent.iterdir()))

    run(QUICKSTART[0])
    sft = tree_digest(tmp_path / "runs" / "sft")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for finished in [pool.submit(run, command) for command in QUICKSTART[1:]]:
            finished.result()
    assert tree_digest(tmp_path / "runs" / "sft") == sft, "a stage changed the SFT run it started from"
    for stage in ("ppo", "grpo", "rloo"):
        assert json.loads((tmp_path / "runs" / stage / "summary.json").read_text())["init"] == "runs/sft", stage
