"""recipes/dpo.py end to end, chained from a real (quick) recipes/sft.py run: what the run leaves behind, what it logs,
that the saved policy is the trained adapter alone, and resume after a real kill."""

import json
import sys
from pathlib import Path

import pytest
from recipe_processes import checkpoint_complete, losses_by_step, run_to_end, run_until
from recipe_runs import assert_run_directory, run_recipe

from finetune.config import DPORunConfig, SFTRunConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"

SFT_QUICK = ["--data.max_train_samples=64", "--train.max_steps=4", "--train.logging_steps=2", "--train.save_steps=2",
             "--data.max_eval_samples=8", "--eval.num_samples=4", "--eval.before_training=false"]
DPO_QUICK = [
    "--data.max_train_samples=32",
    "--data.max_eval_samples=8",
    "--train.max_steps=4",
    "--train.per_device_batch_size=4",
    "--train.logging_steps=2",
    "--train.save_steps=2",
    "--train.save_total_limit=10",
    "--eval.num_samples=4",
    "--eval.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_recipe("sft", SFTRunConfig, ["--output_dir", str(out), *SFT_QUICK]) == 0
    return out


@pytest.fixture(scope="module")
def finished_run(sft_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo") / "run"
    assert run_recipe("dpo", DPORunConfig, ["--init", str(sft_run), "--output_dir", str(out), *DPO_QUICK]) == 0
    return out


def test_run_directory_contents(finished_run):
    out = finished_run
    assert_run_directory(out)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / "checkpoint_complete.json").is_file() for c in checkpoints)


def test_logs_rewards_margins_accuracy_and_gap_to_the_reference(finished_run):
    rows = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4]
    for r in step_rows:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl_gap",
                    "logratio/chosen", "logratio/rejected", "learning_rate", "tokens_per_second"):
            assert isinstance(r[key], float), key
        assert r["kl_gap"] == pytest.approx((r["rewards/chosen"] + r["rewards/rejected"]) / (2 * 0.1))
    # Step 1 is policy == reference: rewards 0 and loss log 2; by step 4 the policy has moved.
    assert step_rows[-1]["kl_gap"] != 0.0


def test_summary_has_eval_figures_and_the_sft_baseline(finished_run):
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_kl_gap",
                "eval_accuracy", "init_eval_accuracy"):
        assert isinstance(summary[key], float), key
    assert 0.0 <= summary["eval_reward_accuracy"] <= 1.0
    assert summary["train_data"]["records"] == 32 and summary["eval_data"]["kept"] == 8
    assert summary["loss"] == "sigmoid" and summary["init"].endswith("run")


def test_saved_policy_is_one_adapter_that_loads_onto_the_base(finished_run, sft_run):
    """The reference is not saved again (it is the --init run's adapter); the policy loads onto the base alone and
    differs from the SFT adapter it started from."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from finetune.models import resolve_model

    assert not (finished_run / "ref").exists()
    policy, sft = load_file(finished_run / "adapter_model.safetensors"), load_file(sft_run / "adapter_model.safetensors")
    assert policy.keys() == sft.keys()
    assert any(not torch.equal(policy[k], sft[k]) for k in policy)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")), finished_run)
    assert list(model.peft_config) == ["default"]


def test_refuses_non_empty_output_dir(finished_run, sft_run, capsys):
    argv = ["--init", str(sft_run), "--output_dir", str(finished_run), *DPO_QUICK]
    assert run_recipe("dpo", DPORunConfig, argv) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def _command(out, sft_run, extra=()):
    args = [*DPO_QUICK, "--train.max_steps=6", "--train.per_device_batch_size=2", "--eval.verifier=null",
            "--data.eval=null", *extra]
    return [sys.executable, RECIPES / "dpo.py", "--init", sft_run, "--output_dir", out, *args]


def test_resume_after_kill_reproduces_the_uninterrupted_loss_curve(sft_run, tmp_path):
    """Kill -9 a DPO run once it has written checkpoint-4, resume it: the policy adapter comes back from the
    checkpoint, the reference again from --init, and the loss at every logged step equals a run never interrupted."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(_command(straight, sft_run))
    run_until(_command(killed, sft_run), checkpoint_complete(killed, 4))
    assert not (killed / "summary.json").exists()

    output = run_to_end(_command(killed, sft_run, ["--resume"]))
    assert "resuming from" in output
    assert losses_by_step(killed) == pytest.approx(losses_by_step(straight), rel=1e-4)
    # The summary's train_loss is the mean over all steps, not only those run after the resume.
    summaries = [json.loads((out / "summary.json").read_text()) for out in (straight, killed)]
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-4)
