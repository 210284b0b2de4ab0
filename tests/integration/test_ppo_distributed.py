"""PPO under 2 CPU processes (accelerate_configs/cpu_ddp.yaml, DDP over the policy and value adapters): each process
samples its share of every iteration's prompts, and the gathered rollouts hold each prompt exactly once; advantages
are whitened with the statistics of both processes' tokens together.

Run as a script (by ``accelerate launch``), this file is the whitening test's worker."""

import json
import sys
from pathlib import Path

import pytest
import torch
from factories import launch_recipe


def test_two_processes_roll_out_every_prompt_exactly_once(tmp_path):
    from factories import make_sft_run

    from finetune.prompts import prompt_schedule

    sft = make_sft_run(tmp_path / "sft")
    out = tmp_path / "ppo"
    proc = launch_recipe("ppo.py", 2, [
        "--init", str(sft), "--output_dir", str(out), "--data.max_train_samples=10", "--data.max_eval_samples=4",
        "--eval.num_samples=4", "--sampling.num_samples=2", "--sampling.max_new_tokens=8",
        "--ppo.num_iterations=2", "--ppo.rollout_batch_size=6", "--ppo.mini_batch_size=3",
        "--score.verifier=toy_verifiers:short_answer",
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
    assert proc.stdout.count("KL to reference") == 1, "the results table comes from the main process only"


def whitening_case():
    """5 responses x 7 tokens of advantages with a ragged mask; the last two responses (the second process's share)
    have a mean 4 higher, so each process's own statistics differ from the whole batch's."""
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=generator, dtype=torch.float64) * 2 + 1
    values[3:] += 4
    mask = torch.rand(5, 7, generator=generator) > 0.3
    return values, mask


def whiten_on_this_process(out: Path) -> None:
    """The worker: process 0 takes responses 0-2, process 1 responses 3-4, and each whitens its share as the PPO stage
    does (``process_sum`` over the accelerator), advantages and (mean kept) rewards."""
    from accelerate import Accelerator

    from finetune.logprobs import masked_whiten
    from finetune.stages.ppo import process_sum

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    values, mask = whitening_case()
    rows = slice(0, 3) if accelerator.process_index == 0 else slice(3, 5)
    total = process_sum(accelerator)
    torch.save({"advantages": masked_whiten(values[rows], mask[rows], sum_across_processes=total),
                "rewards": masked_whiten(values[rows], mask[rows], shift_mean=False, sum_across_processes=total)},
               out / f"process{accelerator.process_index}.pt")


def test_whitening_over_two_processes_equals_one_process_over_the_whole_batch(tmp_path):
    from torch.testing import assert_close

    from finetune.logprobs import masked_whiten

    # launch_recipe joins the script to recipes/; an absolute path replaces it.
    launch_recipe(str(Path(__file__).resolve()), 2, [str(tmp_path)], timeout=300)
    halves = [torch.load(tmp_path / f"process{i}.pt") for i in (0, 1)]
    values, mask = whitening_case()
    for key, shift_mean in (("advantages", True), ("rewards", False)):
        together = torch.cat([h[key] for h in halves])
        assert_close(together, masked_whiten(values, mask, shift_mean=shift_mean), rtol=1e-12, atol=1e-12)
        local = torch.cat([masked_whiten(values[:3], mask[:3], shift_mean), masked_whiten(values[3:], mask[3:], shift_mean)])
        assert (local - together).abs().max() > 0.1, "per-process statistics would have given other values"


if __name__ == "__main__":
    whiten_on_this_process(Path(sys.argv[1]))
