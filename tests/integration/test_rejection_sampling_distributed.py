"""Rejection sampling under 2 CPU processes (accelerate_configs/cpu_ddp.yaml): each process samples its share of the
prompts and the rows are gathered, so every prompt appears exactly once, with its K samples, in prompt order."""

import json
import sys
from pathlib import Path

import pytest
from factories import launch_recipe

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")


def test_two_processes_sample_every_prompt_exactly_once(tmp_path):
    from factories import make_sft_run

    from finetune.data import load_conversations

    sft = make_sft_run(tmp_path / "sft")
    out = tmp_path / "rs"
    # 7 prompts: the processes get 4 and 3.
    launch_recipe("rejection_sampling.py", 2, [
        "--init", str(sft), "--output_dir", str(out), "--generate_only", "--data.max_train_samples=7",
        "--sampling.num_samples=3", "--sampling.max_new_tokens=8", "--score.verifier=toy_verifiers:shortness",
        "--data.train=bundled:suite_messages_train.jsonl", "--rejection.keep_unverified=true",
    ])
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["sample"]) for r in rows] == [(p, k) for p in range(7) for k in range(3)]
    prompts = [c.messages[0]["content"] for c in load_conversations("bundled:suite_messages_train.jsonl", limit=7)]
    assert [r["prompt"][0]["content"] for r in rows[::3]] == prompts
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["num_prompts"] == 7 and summary["num_samples"] == 21
    kept = [json.loads(line) for line in (out / "kept.jsonl").read_text().splitlines()]
    assert sorted(k["prompt_index"] for k in kept) == sorted({r["prompt_index"] for r in rows if r["kept"]})


def test_two_processes_fine_tune_and_resume_after_kill(tmp_path):
    """The whole recipe under cpu_ddp.yaml: sampling, then the SFT stage under DDP. A run killed once sft/checkpoint-2
    is complete and resumed (samples reused, fine-tune from the checkpoint) ends where an uninterrupted 2-process run
    does: same loss at every step, same summary."""
    from factories import free_port, make_sft_run
    from recipe_processes import checkpoint_complete, losses_by_step, run_to_end, run_until

    sft = make_sft_run(tmp_path / "sft")

    def command(out, *extra):
        return [ACCELERATE, "launch", "--config_file", ROOT / "accelerate_configs" / "cpu_ddp.yaml",
                "--main_process_port", str(free_port()), ROOT / "recipes" / "rejection_sampling.py",
                "--init", sft, "--output_dir", out, "--data.max_train_samples=7", "--data.max_eval_samples=4",
                "--eval.num_samples=4", "--sampling.num_samples=3", "--sampling.max_new_tokens=8",
                "--score.verifier=toy_verifiers:shortness", "--rejection.keep_unverified=true",
                "--data.train=bundled:suite_messages_train.jsonl", "--train.max_steps=4",
                "--train.per_device_batch_size=2", "--train.logging_steps=1", "--train.save_steps=2",
                "--train.save_total_limit=10", "--train.warmup_ratio=0", *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight))
    run_until(command(killed), checkpoint_complete(killed / "sft", 2))
    output = run_to_end(command(killed, "--resume"))
    assert "reusing the complete samples" in output and "resuming from" in output
    assert output.count("verifier accuracy  ") == 1, "the results table is printed once"
    assert len(losses_by_step(straight / "sft")) == 4
    assert losses_by_step(killed / "sft") == pytest.approx(losses_by_step(straight / "sft"), rel=1e-4)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    assert a["num_processes"] == b["num_processes"] == 2
    for key in ("train_loss", "eval_loss", "init_eval_loss", "eval_accuracy", "init_eval_accuracy", "mean_score_all",
                "kept_samples", "train_steps"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key
