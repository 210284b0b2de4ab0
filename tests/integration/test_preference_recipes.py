"""recipes/kto.py and recipes/dpo.py with dpo.loss orpo and simpo, end to end from the shipped tiny configs, chained
from a real (quick) recipes/sft.py run: what each run leaves, the figures it reports, and that the saved policy is
the trained adapter alone (no reference is saved, none is built for ORPO and SimPO)."""

import json
from pathlib import Path

import pytest
from recipe_runs import assert_run_directory, run_recipe

from finetune.config import DPORunConfig, KTORunConfig, SFTRunConfig

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny"
SFT_QUICK = ["--data.max_train_samples=64", "--train.max_steps=4", "--train.logging_steps=2", "--train.save_steps=2",
             "--data.max_eval_samples=8", "--eval.num_samples=4", "--eval.before_training=false"]
QUICK = ["--data.max_train_samples=16", "--data.max_eval_samples=8", "--train.max_steps=4",
         "--train.logging_steps=2", "--train.save_steps=2", "--eval.num_samples=4", "--eval.max_new_tokens=8"]
RUNS = {  # name -> (recipe, config class, shipped tiny config)
    "kto": ("kto", KTORunConfig, "kto_lora.yaml"),
    "orpo": ("dpo", DPORunConfig, "dpo_orpo_lora.yaml"),
    "simpo": ("dpo", DPORunConfig, "dpo_simpo_lora.yaml"),
}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_recipe("sft", SFTRunConfig, ["--output_dir", str(out), *SFT_QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def finished(sft_run, tmp_path_factory):
    """Each method's run from the shipped tiny config, --init the SFT run."""
    runs = {}
    for name, (recipe, config_class, config) in RUNS.items():
        out = tmp_path_factory.mktemp(name) / "run"
        argv = ["--config", str(CONFIGS / config), "--init", str(sft_run), "--output_dir", str(out), *QUICK]
        assert run_recipe(recipe, config_class, argv) == 0, name
        runs[name] = out
    return runs


@pytest.mark.parametrize("name", list(RUNS))
def test_run_directory_and_saved_policy(name, finished, sft_run):
    import torch
    from safetensors.torch import load_file

    out = finished[name]
    assert_run_directory(out)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    policy, sft = load_file(out / "adapter_model.safetensors"), load_file(sft_run / "adapter_model.safetensors")
    assert policy.keys() == sft.keys(), "the policy continues the SFT adapter and is saved alone"
    assert any(not torch.equal(policy[k], sft[k]) for k in policy)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == \
        json.loads((sft_run / "adapter_config.json").read_text())["r"]


def test_kto_summary_and_metrics(finished):
    out = finished["kto"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "kto" and summary["init"].endswith("run")
    assert summary["train_data"]["kept"] == 32 and summary["train_data"]["desirable"] == 16  # 16 pairs, split
    for key in ("train_loss", "eval_loss", "eval_kl", "eval_reward_margin", "eval_accuracy", "init_eval_accuracy"):
        assert isinstance(summary[key], float), key
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4]
    for key in ("rewards/chosen", "rewards/rejected", "kl", "kl_gap", "learning_rate", "tokens_per_second"):
        assert isinstance(step_rows[-1][key], float), key


@pytest.mark.parametrize("name", ["orpo", "simpo"])
def test_reference_free_summary_and_metrics(name, finished):
    out = finished[name]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == name and summary["reference"] is False and "eval_kl_gap" not in summary
    for key in ("train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_accuracy"):
        assert isinstance(summary[key], float), key
    step_rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4]
    assert "kl_gap" not in step_rows[-1]  # nothing to drift from
    assert isinstance(step_rows[-1]["rewards/accuracies"], float) and isinstance(step_rows[-1]["nll_loss"], float)


def test_kto_refuses_a_non_empty_output_dir(finished, sft_run, capsys):
    argv = ["--init", str(sft_run), "--output_dir", str(finished["kto"]), *QUICK]
    assert run_recipe("kto", KTORunConfig, argv) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def test_kto_on_conversation_data_is_a_one_line_error(sft_run, tmp_path, capsys):
    argv = ["--init", str(sft_run), "--output_dir", str(tmp_path / "kto"), "--data.train=bundled:suite_alpaca_train.jsonl",
            "--data.eval=null", *QUICK]
    assert run_recipe("kto", KTORunConfig, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "unpaired preference data" in err and "\n" not in err
    assert not (tmp_path / "kto").exists()
