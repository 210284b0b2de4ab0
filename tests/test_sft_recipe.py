"""recipes/sft.py end to end on the tiny model: what the run leaves behind, bad input, resume after a real kill."""

import json
import sys
from pathlib import Path

import pytest
import recipe_runs
from recipe_processes import checkpoint_complete, losses_by_step, run_to_end, run_until
from recipe_runs import assert_run_directory

from finetune.config import SFTConfig

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "sft.py"

# Small and quick: 64 conversations, 8 optimizer steps, a checkpoint every 2.
QUICK = [
    "--data.max_train_samples=64",
    "--data.max_eval_samples=16",
    "--train.max_steps=8",
    "--train.per_device_batch_size=2",
    "--train.logging_steps=2",
    "--train.save_steps=2",
    "--train.save_total_limit=10",
    "--eval.num_samples=8",
]


def run_recipe(argv):
    return recipe_runs.run_recipe("sft", SFTConfig, argv)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_recipe(["--output_dir", str(out), *QUICK]) == 0
    return out


def test_run_directory_contents(finished_run):
    out = finished_run
    assert_run_directory(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4, 6, 8]
    for r in step_rows:
        assert r["loss"] > 0 and r["learning_rate"] >= 0 and r["tokens_per_second"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "base_eval_loss", "eval_accuracy", "base_eval_accuracy"):
        assert isinstance(summary[key], float), key
    assert summary["train_data"]["records"] == 64 and summary["train_data"]["skipped_records"] == 0
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / "checkpoint_complete.json").is_file() for c in checkpoints)


def test_saved_tokenizer_and_generation_config_stop_at_eot(finished_run):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(finished_run).eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_adapter_loads_onto_the_base(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    model = PeftModel.from_pretrained(base, finished_run)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_refuses_non_empty_output_dir(finished_run, capsys):
    assert run_recipe(["--output_dir", str(finished_run), *QUICK]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def test_bad_data_is_one_line_error(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    code = run_recipe(["--output_dir", str(tmp_path / "run"), f"--data.train={data}", "--data.eval=null"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "bad.jsonl, line 2" in err and "Traceback" not in err


def test_unknown_key_is_one_line_error(tmp_path, capsys):
    assert run_recipe(["--output_dir", str(tmp_path / "r"), "--train.lr=1"]) == 2
    assert "unknown config key 'train.lr'" in capsys.readouterr().err


def _command(out, extra=()):
    args = [*QUICK, "--train.max_steps=16", "--eval.before_training=false", "--eval.num_samples=4", *extra]
    return [sys.executable, RECIPE, "--output_dir", out, *args]


def test_resume_after_kill_reproduces_the_uninterrupted_loss_curve(tmp_path):
    """Kill -9 a run once it has written checkpoint-4, resume it, and compare its loss curve with a run that was
    never interrupted: the same losses at every logged step."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(_command(straight))
    run_until(_command(killed), checkpoint_complete(killed, 4))
    assert not (killed / "summary.json").exists()

    output = run_to_end(_command(killed, ["--resume"]))
    assert "resuming from" in output
    # metrics.jsonl holds the killed run's rows and the resumed run's; the latest row per step wins.
    assert losses_by_step(killed) == pytest.approx(losses_by_step(straight), rel=1e-4)
    # The summary's train_loss is the mean over all steps, not only those run after the resume.
    summaries = [json.loads((out / "summary.json").read_text()) for out in (straight, killed)]
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-4)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    """A learning rate of 1e9 makes the gradients NaN at step 2: the run stops there with one line naming the step,
    writes no checkpoint, adapter or summary after it, and checkpoint-1 stays complete for --resume."""
    out = tmp_path / "run"
    code = run_recipe([
        "--output_dir", str(out), "--data.max_train_samples=32", "--data.eval=null", "--train.max_steps=6",
        "--train.logging_steps=1", "--train.save_steps=1", "--train.learning_rate=1e9", "--train.warmup_ratio=0",
        "--eval.before_training=false",
    ])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: grad_norm nan at step 2; stopped without saving" in err and "checkpoint-1" in err
    assert (out / "checkpoint-1" / "checkpoint_complete.json").is_file()
    assert not (out / "checkpoint-2").exists()
    assert not (out / "summary.json").exists() and not (out / "adapter_model.safetensors").exists()
