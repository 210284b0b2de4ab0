"""KTO and SimPO resume after a real kill: SIGKILL once checkpoint-4 is complete, --resume, and the loss at every
logged step equals a run never interrupted (KTO's shuffled rows and in-order sampling, and the policy-only trainers
of the reference-free losses, come back exactly)."""

import json
import sys
from pathlib import Path

import pytest
from factories import make_sft_run
from recipe_processes import checkpoint_complete, losses_by_step, run_to_end, run_until

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
QUICK = ["--data.max_train_samples=16", "--train.max_steps=6", "--train.logging_steps=1", "--train.save_steps=2",
         "--train.save_total_limit=10", "--eval.verifier=null", "--data.eval=null"]
RUNS = {"kto": ("kto", "kto_lora.yaml", ["--train.per_device_batch_size=4"]),
        "simpo": ("dpo", "dpo_simpo_lora.yaml", ["--train.per_device_batch_size=2"])}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


def command(name, out, sft_run, extra=()):
    recipe, config, batch = RUNS[name]
    return [sys.executable, ROOT / "recipes" / f"{recipe}.py", "--config", CONFIGS / config, "--init", sft_run,
            "--output_dir", out, *QUICK, *batch, *extra]


@pytest.mark.parametrize("name", list(RUNS))
def test_resume_after_kill_reproduces_the_uninterrupted_loss_curve(name, sft_run, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(name, straight, sft_run))
    run_until(command(name, killed, sft_run), checkpoint_complete(killed, 4))
    assert not (killed / "summary.json").exists()
    output = run_to_end(command(name, killed, sft_run, ["--resume"]))
    assert "resuming from" in output
    assert len(losses_by_step(straight)) == 6
    assert losses_by_step(killed) == pytest.approx(losses_by_step(straight), rel=1e-4)
    summaries = [json.loads((out / "summary.json").read_text()) for out in (straight, killed)]
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-4)
