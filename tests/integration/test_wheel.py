"""The wheel is the whole toolkit: built from the sources, installed into a fresh virtual environment and run from a
directory outside the checkout, it trains the tiny model (its embedded base and bundled data come with it) through
``accelerate launch -m finetune.cli sft``, lists every command, and keeps a user error one line under the launcher
(its ``finetune_launcher.pth``). The new environment reaches torch and the other dependencies through a path to the
shared environment's site-packages, so nothing is downloaded or reinstalled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("finetune", "data_formats", "pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (the build writes build/ and egg-info beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(dist), str(source)], check=True, cwd=source)
    (built,) = dist.glob("finetune-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no dependencies: those come from the shared site-packages)."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # A plain path line: the shared packages become importable, but their .pth files (the checkout's editable
    # install among them) are not run, so `finetune` can only be the wheel's.
    (site / "zz_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True)
    return venv


def outside_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_wheel_carries_the_tiny_base_the_data_and_the_launcher_hook(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "finetune_launcher.pth" in names
    for required in ("finetune/tiny_base/model.safetensors", "finetune/tiny_base/tokenizer.json",
                     "finetune/tiny_base/config.json", "data_formats/samples/suite_messages_train.jsonl",
                     "data_formats/samples/suite_preference_train.jsonl", "finetune/launch.py",
                     "finetune/stages/sft.py", "finetune/lm_eval_tasks/finetune_suite.yaml",
                     "finetune/lm_eval_tasks/suite_data.py"):
        assert required in names, required


def test_installed_package_trains_from_outside_the_checkout(venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = outside_env()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import finetune; print(finetune.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout
    assert where.startswith(str(venv)), where

    listed = subprocess.run([str(venv / "bin" / "finetune"), "--help"], cwd=work, env=env, check=True,
                            capture_output=True, text=True).stdout
    for verb in ("sft", "reward", "rejection-sampling", "dpo", "kto", "ppo", "render", "convert", "export", "chat",
                 "eval", "serve", "push"):
        assert f"    {verb}" in listed, verb

    accelerate = [str(venv / "bin" / "python"), str(Path(sys.executable).with_name("accelerate")), "launch",
                  "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "-m", "finetune.cli", "sft"]
    quick = ["--train.max_steps=3", "--data.max_train_samples=16", "--data.max_eval_samples=4",
             "--eval.num_samples=4", "--eval.max_new_tokens=8", "--output_dir", "runs/sft"]
    result = subprocess.run([*accelerate, *quick], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = work / "runs" / "sft"
    assert (run / "adapter_model.safetensors").is_file() and (run / "tokenizer.json").is_file()
    assert json.loads((run / "summary.json").read_text())["train_steps"] == 3

    bad = subprocess.run([*accelerate, "--train.per_device_batch_size=0"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert [line for line in bad.stderr.splitlines() if line.startswith("error:")] == [
        "error: train.per_device_batch_size must be >= 1; got 0"]
