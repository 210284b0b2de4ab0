"""PPO under 2 CPU processes (accelerate_configs/cpu_ddp.yaml, DDP over the policy and value adapters): each process
samples its share of every iteration's prompts, and the gathered rollouts hold each prompt exactly once."""

import json

import pytest
from test_rejection_sampling_distributed import launch_two_processes


@pytest.mark.slow
def test_two_processes_roll_out_every_prompt_exactly_once(tmp_path):
    from test_dpo import make_sft_run

    from finetune.stages.ppo import prompt_schedule

    sft = make_sft_run(tmp_path / "sft")
    out = tmp_path / "ppo"
    launch_two_processes("ppo.py", [
        "--init", str(sft), "--output_dir", str(out), "--data.max_train_samples=10", "--data.max_eval_samples=4",
        "--eval.num_samples=4", "--sampling.num_samples=2", "--sampling.max_new_tokens=8",
        "--ppo.num_iterations=2", "--ppo.rollout_batch_size=6", "--ppo.mini_batch_size=3",
        "--score.verifier=test_ppo:short_answer",
    ])
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    for iteration in (1, 2):
        mine = [(r["prompt_index"], r["sample"]) for r in rollouts if r["iteration"] == iteration]
        expected = sorted((p, k) for p in prompt_schedule(10, iteration - 1, 6, seed=42) for k in range(2))
        assert sorted(mine) == expected, iteration
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
