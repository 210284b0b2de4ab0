"""A user's mistake in a recipe's config or ``--init`` is one ``error:`` line naming the key, exit status 2, before
anything is written: in the recipe's own process for each misuse, and through ``accelerate launch`` (one process and
two-process CPU DDP), where the launcher's own traceback is kept away by ``finetune.launcher_exit``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from recipe_runs import run_recipe

from finetune.config import STAGE_CONFIGS

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """What a LoRA SFT run leaves for ``--init`` (config.yaml and an r=8 adapter); a fresh adapter is enough here."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.config import AdapterConfig, SFTRunConfig
    from finetune.models import lora_config, resolve_model
    from finetune.runs import write_config

    directory = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")),
                           lora_config(AdapterConfig(r=8, alpha=16)))
    model.save_pretrained(directory)
    write_config(directory, SFTRunConfig(output_dir=str(directory)))
    return directory


def damaged_copy(sft_run: Path, tmp_path: Path, how: str) -> Path:
    """A copy of ``sft_run`` damaged one way: ``config`` (adapter_config.json not JSON), ``truncated`` (weights cut
    short) or ``rank`` (adapter_config.json says another r than the tensors have)."""
    import shutil

    run = tmp_path / f"init-{how}"
    shutil.copytree(sft_run, run)
    adapter_config = run / "adapter_config.json"
    if how == "config":
        adapter_config.write_text('{"r": 8, "lora_alpha": ')
    elif how == "truncated":
        weights = run / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "rank":
        adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "r": 4}))
    return run


# (stage, arguments, what the one line must say). {init} is an SFT run; {init:HOW} a damaged copy of it.
MISUSES = [
    ("sft", ["--train.per_device_batch_size=0"], "train.per_device_batch_size must be >= 1; got 0"),
    ("sft", ["--data.max_length=0"], "data.max_length must be >= 1; got 0"),
    ("sft", ["--adapter.dropout=2"], "adapter.dropout must be in [0.0, 1.0); got 2.0"),
    ("sft", ["--adapter.target_modules=q_prj,v_proj"], "adapter.target_modules: 'q_prj' match no module of tiny; "
                                                       "its linear modules are down_proj, gate_proj, k_proj"),
    ("sft", ["--model.dtype=float8"], "model.dtype must be one of auto, bfloat16, float16, float32; got 'float8'"),
    ("sft", ["--train.optim=adamw_bogus"], "train.optim must be one of adamw_torch"),
    ("sft", ["--train.lr_scheduler=cosinus"], "train.lr_scheduler must be one of linear, cosine"),
    ("sft", ["--model.attn_implementation=flash"], "model.attn_implementation must be one of auto, sdpa_packed"),
    ("sft", ["--model.name=/nonexistent/model"], "model.name: cannot load a model config from '/nonexistent/model'"),
    ("sft", ["--model.name=nobody-here/no-such-model"], "model.name: cannot load a model config from 'nobody-here/"),
    ("sft", ["--train.num_epochs=0"], "train.num_epochs must be > 0; got 0.0"),
    ("sft", ["--adapter.alpha=0"], "adapter.alpha must be > 0; got 0"),
    ("sft", ["--adapter.r=0"], "adapter.r must be > 0; got 0"),
    ("sft", ["--data.max_train_samples=-1"], "data.max_train_samples must be >= 1 or null; got -1"),
    ("sft", ["--data.max_eval_samples=0"], "data.max_eval_samples must be >= 1 or null; got 0"),
    ("sft", ["--train.gradient_accumulation_steps=0"], "train.gradient_accumulation_steps must be >= 1; got 0"),
    ("sft", ["--train.max_steps=0"], "train.max_steps (-1 for num_epochs) must be >= 1; got 0"),
    ("sft", ["--train.learning_rate=-1e-3"], "train.learning_rate must be > 0; got -0.001"),
    ("sft", ["--train.learning_rate=inf"], "train.learning_rate must be > 0; got inf"),
    ("sft", ["--train.max_grad_norm=0"], "train.max_grad_norm must be > 0; got 0.0"),
    ("sft", ["--train.weight_decay=-0.1"], "train.weight_decay must be >= 0; got -0.1"),
    ("sft", ["--train.save_total_limit=0"], "train.save_total_limit must be >= 1 or null; got 0"),
    ("sft", ["--eval.batch_size=0"], "eval.batch_size must be >= 1; got 0"),
    ("sft", ["--eval.max_new_tokens=0"], "eval.max_new_tokens must be >= 1; got 0"),
    ("sft", ["--data.template=llama4"], "data.template must be one of llama3, llama2"),
    ("sft", ["--data.format=csvish"], "data.format must be one of auto, alpaca"),
    ("sft", ["--eval.verifier=finetune.suite"], "eval.verifier must be 'module:function'"),
    ("sft", ["--data.train="], "data.train must name the training data"),
    ("reward", ["--data.max_length=1"], "data.max_length must be >= 2; got 1"),
    ("reward", ["--train.per_device_batch_size=0"], "train.per_device_batch_size must be >= 1; got 0"),
    ("reward", ["--data.max_length=3"], "no training rows left from bundled:suite_preference_train.jsonl"),
    ("dpo", ["--init", "{init}", "--data.max_length=3"], "no training rows left"),
    ("dpo", ["--init", "{init}", "--dpo.beta=0"], "dpo.beta must be positive"),
    ("dpo", ["--init", "{init:config}"], "adapter_config.json: cannot read it"),
    ("dpo", ["--init", "{init:truncated}"], "cannot read adapter_model.safetensors"),
    ("dpo", ["--init", "{init:rank}"], "has rank 8 but adapter_config.json says r=4"),
    ("dpo", ["--init", "{missing}"], "no such directory"),
    ("reward", ["--init", "{init:config}"], "adapter_config.json: cannot read it"),
    ("rejection_sampling", ["--init", "{init}", "--sampling.num_samples=0"], "sampling.num_samples must be at least 1"),
    ("rejection_sampling", ["--init", "{init}", "--sampling.top_k=-1"], "sampling.top_k (0 keeps all) must be >= 0"),
    ("rejection_sampling", ["--init", "{init}", "--rejection.min_margin=-1"], "rejection.min_margin must be >= 0"),
    ("rejection_sampling", ["--init", "{init}", "--data.train=my_prompts.jsonl"], "score needs a verifier"),
    ("ppo", ["--init", "{init}", "--ppo.gamma=1.5"], "ppo.gamma must be in [0.0, 1.0]; got 1.5"),
    ("ppo", ["--init", "{init}", "--ppo.lam=-0.1"], "ppo.lam must be in [0.0, 1.0]; got -0.1"),
    ("ppo", ["--init", "{init}", "--ppo.mini_batch_size=0"], "ppo.num_iterations, rollout_batch_size, mini_batch_size"),
    ("ppo", ["--init", "{init:rank}"], "has rank 8 but adapter_config.json says r=4"),
    ("grpo", [], "grpo needs --init DIR"),
    ("grpo", ["--init", "{init}", "--sampling.num_samples=1"], "sampling.num_samples (the group size) must be >= 2"),
    ("grpo", ["--init", "{init}", "--grpo.advantage=mean"], "grpo.advantage must be group or leave_one_out"),
    ("grpo", ["--init", "{init}", "--grpo.kl_mode=both"], "grpo.kl_mode must be loss or reward"),
    ("grpo", ["--init", "{init}", "--grpo.advantage=leave_one_out"], "set grpo.scale_advantages=false"),
    ("grpo", ["--init", "{init}", "--grpo.kl_coef=-1"], "grpo.kl_coef must be >= 0"),
    ("grpo", ["--init", "{init}", "--grpo.epochs=0"], "grpo.epochs must be >= 1"),
    ("rloo", ["--init", "{init}", "--sampling.top_p=0.9"], "rloo samples from the policy itself"),
    ("rloo", ["--init", "{init:rank}"], "has rank 8 but adapter_config.json says r=4"),
]


@pytest.mark.parametrize("stage, argv, message", MISUSES, ids=[f"{s}{''.join(a[-1:])}" for s, a, _ in MISUSES])
def test_misuse_is_one_line_and_exit_status_2(stage, argv, message, sft_run, tmp_path, capsys):
    out = tmp_path / "out"
    filled = []
    for arg in argv:
        if arg == "{init}":
            arg = str(sft_run)
        elif arg.startswith("{init:"):
            arg = str(damaged_copy(sft_run, tmp_path, arg[6:-1]))
        elif arg == "{missing}":
            arg = str(tmp_path / "no-such-run")
        filled.append(arg)
    assert run_recipe(stage, STAGE_CONFIGS[stage], [*filled, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert not out.exists(), "nothing is written before the config is checked"


def test_duplicate_yaml_key_names_key_file_and_lines(tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text("train:\n  learning_rate: 1.0e-3\n  num_epochs: 1\n  learning_rate: 2.0e-3\n")
    assert run_recipe("sft", STAGE_CONFIGS["sft"], ["--config", str(config)]) == 2
    assert capsys.readouterr().err == (f"error: {config}, line 4: duplicate key 'learning_rate' (first on line 2); "
                                       "give each key once\n")


@pytest.fixture(scope="module")
def hooked_python(tmp_path_factory):
    """A Python whose start-up runs ``finetune_launcher.pth`` as an installed package's would: a bare venv whose
    site-packages holds the hook and a path to the shared environment's packages (the checkout comes first through
    PYTHONPATH)."""
    venv = tmp_path_factory.mktemp("hooked") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (site / "finetune_launcher.pth").write_text((ROOT / "finetune" / "finetune_launcher.pth").read_text())
    return python


def accelerate_launch(python: Path, launcher: list[str], recipe_args: list[str], **env: str):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(python), str(accelerate), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", *launcher, "recipes/sft.py", *recipe_args]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **env})


LAUNCHERS = {
    "one-process": ([ "--num_processes", "1"], {}),
    "cpu-ddp": (["--multi_gpu", "--num_processes", "2"], {"ACCELERATE_USE_CPU": "true"}),
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize("argv, message", [
    (["--train.per_device_batch_size=0"], "error: train.per_device_batch_size must be >= 1; got 0"),
    # Raised by the stage after torch and the model are loaded, on every rank.
    (["--data.train=/nonexistent/train.jsonl"], "error: /nonexistent/train.jsonl"),
], ids=["config", "data"])
def test_user_error_is_one_line_under_accelerate_launch(hooked_python, launcher, argv, message, tmp_path):
    args, env = LAUNCHERS[launcher]
    result = accelerate_launch(hooked_python, args, [*argv, "--output_dir", str(tmp_path / "out")], **env)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), result.stderr
    assert "exitcode" not in result.stderr and "closing signal" not in result.stderr, result.stderr


def test_other_failures_keep_the_launchers_report(hooked_python, tmp_path):
    """A crash (not a user error) is not hidden: accelerate's traceback and its exit status 1 stay."""
    crash = tmp_path / "crash.py"
    crash.write_text("raise RuntimeError('a bug')\n")
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(hooked_python), str(accelerate), "launch", "--num_processes", "1", "--num_machines",
                             "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(crash)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert "RuntimeError: a bug" in result.stderr and "CalledProcessError" in result.stderr


def test_a_run_directorys_saved_verifier_is_never_imported(sft_run, tmp_path, monkeypatch):
    """A run's config.yaml is a record: reading the run for --init (checks, adapter shape) or for export never
    imports the verifier it names (importing runs the module's code)."""
    import shutil

    import yaml

    from finetune.config import DPORunConfig, parse_args
    from finetune.export import inspect_run
    from finetune.launch import check_before_run
    from finetune.run_dir import resolve_init

    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["eval"]["verifier"] = "planted_verifier:verify"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    marker = tmp_path / "imported"
    (tmp_path / "planted_verifier.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n\ndef verify(prompt, response):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    cfg = parse_args(DPORunConfig, ["--init", str(run), "--output_dir", str(tmp_path / "out")])
    check_before_run(cfg)
    resolve_init(cfg)
    inspect_run(run)
    assert cfg.eval.verifier == "finetune.suite:verify"  # the passed config's (auto on the bundled suite)
    assert not marker.exists()
