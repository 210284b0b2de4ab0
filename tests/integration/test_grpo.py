"""GRPO and RLOO on one base with the policy, reference (and reward) adapters (finetune.stages.grpo): the roles with
no critic, the reference being the SFT adapter and not the base with adapters off (what TRL's GRPOTrainer and
RLOOTrainer use with a PEFT model), the group layout of the advantages, two-iteration runs on the tiny model from a
stand-in SFT run, the KL in the reward (RLOO) or in the loss (GRPO), a 4-bit base, the recipe from the command line,
and --resume after a SIGKILL. Stand-in SFT and reward runs (random non-zero LoRA adapters saved like the recipes
save them) keep these to seconds."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from factories import make_reward_run, make_sft_run
from torch.testing import assert_close

from finetune.config import GRPORunConfig, RLOORunConfig, parse_args
from finetune.losses import group_advantages, leave_one_out_advantages
from finetune.models import resolve_model
from finetune.roles import POLICY, REFERENCE, REWARD
from finetune.stages import grpo

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
# A few prompts, groups of 4 over the whole distribution (the tuned default is the top 3) so the stand-in verifier
# below sees varied answers, and a learning rate that moves the stand-in policy in two iterations.
QUICK = ["--data.max_train_samples=16", "--data.max_eval_samples=8", "--eval.num_samples=8",
         "--sampling.num_samples=4", "--sampling.max_new_tokens=12", "--sampling.top_k=0",
         "--grpo.rollout_batch_size=2", "--grpo.mini_batch_size=4", "--grpo.epochs=2", "--grpo.learning_rate=5e-3",
         "--score.verifier=toy_verifiers:short_answer"]




@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


def grpo_config(out, sft_run, *extra, cls=GRPORunConfig):
    return parse_args(cls, ["--init", str(sft_run), "--output_dir", str(out), *QUICK, *extra])


def response_logprobs(model, input_ids, attention_mask, labels):
    """Per-token log-probs of ``labels`` from the full logits (an independent path from the stage's)."""
    from finetune.logprobs import token_logprobs

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    return token_logprobs(logits[:, :-1], labels) * (labels != -100)


def eval_batch(tokenizer, n=3):
    """A few eval prompts with their reference replies, laid out as a rollout."""
    from finetune.data import load_conversations
    from finetune.rollout import build_rollout
    from finetune.templates import get_template, render_prompt

    template = get_template("llama3", tokenizer)
    convs = load_conversations("bundled:suite_messages_eval.jsonl", limit=n)
    prompts = [render_prompt(template, c.messages[:-1], tokenizer) for c in convs]
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    responses = [tokenizer.encode(c.messages[-1]["content"], add_special_tokens=False) + [eot] for c in convs]
    return build_rollout(prompts, responses, tokenizer.pad_token_id)


def test_roles_are_policy_reference_and_reward_on_one_base_with_no_critic(tmp_path, sft_run):
    from finetune.roles import load_roles

    reward_run = make_reward_run(tmp_path / "reward")
    cfg = grpo.resolve_init(grpo_config(tmp_path / "g", sft_run, f"--score.reward_model={reward_run}"))
    roles = load_roles(cfg, value=False)
    assert set(roles.model.peft_config) == {POLICY, REFERENCE, REWARD} and roles.value_head is None
    for role in (POLICY, REFERENCE, REWARD):
        roles.use(role)
        trainable = {n.split(".lora_")[1].split(".")[1] for n, p in roles.model.named_parameters() if p.requires_grad}
        assert trainable == {POLICY}, role
    params = dict(roles.model.named_parameters())
    for name, p in params.items():
        if f".{POLICY}." in name:
            assert torch.equal(p, params[name.replace(f".{POLICY}.", f".{REFERENCE}.")])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_run):
    """Two GRPO iterations on the tiny model, rewarded by short_answer; returns (output dir, summary, roles)."""
    out = tmp_path_factory.mktemp("grpo") / "run"
    summary, roles = grpo.train(grpo_config(out, sft_run, "--grpo.num_iterations=2"))
    return out, summary, roles


def test_run_logs_every_iteration_and_writes_the_run_directory(trained):
    out, summary, _ = trained
    for name in ("config.yaml", "metrics.jsonl", "rollouts.jsonl", "summary.json", "adapter_model.safetensors",
                 "adapter_config.json", "tokenizer.json", "generation_config.json", "loss.png", "run.json"):
        assert (out / name).is_file(), name
    assert not (out / "value").exists(), "no critic"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("score", "reward", "kl", "policy_loss", "kl_loss", "clip_fraction", "entropy", "equal_groups",
                    "advantage_abs", "response_length", "learning_rate", "loss", "approx_kl", "iteration_seconds"):
            assert isinstance(row[key], float) and row[key] == row[key], key
        assert row["optimizer_steps"] % 4 == 0  # 2 prompts x 4 samples / minibatch 4 x 2 epochs per iteration
        assert 0 <= row["equal_groups"] <= 1 and 0 <= row["clip_fraction"] <= 1
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5), "the first rollout comes from the SFT policy itself"
    assert rows[0]["reward"] == pytest.approx(rows[0]["score"]), "kl_mode=loss: the KL is not in the reward"
    assert rows[1]["kl"] != 0.0 and rows[1]["kl_loss"] > 0
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 2 * 2 * 4 and {r["iteration"] for r in rollouts} == {1, 2}
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["method"] == "GRPO"
    for key in ("init_eval_accuracy", "eval_accuracy", "final_score", "final_kl"):
        assert key in saved, key


def test_policy_trains_and_the_reference_is_the_sft_adapter_not_the_base(trained, sft_run, tokenizer):
    """The KL anchor is the SFT model: the reference role's log-probs equal the SFT run's model's and differ from
    the base with the adapters off (TRL's GRPOTrainer/RLOOTrainer reference for a PEFT model without a ``ref``
    adapter). The saved adapter is the trained policy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out, _, roles = trained
    batch = eval_batch(tokenizer)
    args = batch.input_ids, batch.attention_mask, batch.labels
    sft = response_logprobs(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")),
                                                      str(sft_run)).eval(), *args)
    base = response_logprobs(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval(), *args)
    roles.use(REFERENCE)
    reference = response_logprobs(roles.model, *args)
    roles.use(POLICY)
    policy = response_logprobs(roles.model, *args)
    assert_close(reference, sft, atol=1e-4, rtol=1e-4)
    assert (reference - base).abs().max() > 1e-2, "the reference is not the base with adapters off"
    assert (policy - sft).abs().max() > 1e-3, "the policy adapter moved"
    trained_run = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model("tiny")), str(out))
    assert_close(response_logprobs(trained_run.eval(), *args), policy, atol=1e-4, rtol=1e-4)


def test_advantages_compare_each_response_with_its_own_prompts_group(trained):
    """rollouts.jsonl is in the rollout's layout (sample j of the i-th prompt at i * G + j); GRPO's advantages of
    the first iteration (KL 0) recomputed from its scores by prompt equal the group function's, and RLOO's are
    G/(G-1) times the unscaled ones."""
    out, _, _ = trained
    rows = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines() if '"iteration": 1,' in line]
    assert [(r["prompt_index"], r["sample"]) for r in rows] == sorted((r["prompt_index"], r["sample"]) for r in rows)
    assert [r["sample"] for r in rows] == [0, 1, 2, 3] * 2
    scores = torch.tensor([r["score"] for r in rows])
    by_hand = torch.cat([(g - g.mean()) / (g.std() + 1e-4) for g in scores.view(2, 4)])
    assert_close(group_advantages(scores, 4), by_hand)
    assert_close(leave_one_out_advantages(scores, 4), group_advantages(scores, 4, scale=False) * 4 / 3)
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["advantage_abs"] == pytest.approx(by_hand.abs().mean().item(), rel=1e-5)


def test_rloo_takes_the_kl_off_the_reward(tmp_path, sft_run):
    """recipes/rloo.py's config: the leave-one-out baseline and the KL as a penalty in the reward (none in the loss),
    so at the second iteration reward = score - beta * KL."""
    out = tmp_path / "rloo"
    summary, _ = grpo.train(grpo_config(out, sft_run, "--grpo.num_iterations=2", "--grpo.kl_coef=0.5",
                                        "--eval.before_training=false", cls=RLOORunConfig))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["method"] == "RLOO" and summary["kl_mode"] == "reward"
    assert rows[1]["kl"] != 0 and rows[1]["kl_loss"] == 0
    assert rows[1]["reward"] == pytest.approx(rows[1]["score"] - 0.5 * rows[1]["kl"], abs=1e-5)
    assert json.loads((out / "run.json").read_text())["stage"] == "rloo"


def test_qlora_one_iteration(tmp_path, sft_run):
    """The one base in 4-bit NF4 (bitsandbytes on CPU), with top-k rollouts: the roles switch and the policy trains."""
    import bitsandbytes as bnb

    cfg = grpo_config(tmp_path / "q", sft_run, "--adapter.method=qlora", "--grpo.num_iterations=1", "--sampling.top_k=5",
                      "--eval.before_training=false")
    summary, roles = grpo.train(cfg)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in roles.model.modules())
    row = json.loads((tmp_path / "q" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["kl"] == pytest.approx(0.0, abs=1e-5) and row["optimizer_steps"] == 4
    params = dict(roles.model.named_parameters())
    assert any(not torch.equal(p, params[n.replace(f".{POLICY}.", f".{REFERENCE}.")])
               for n, p in params.items() if f".{POLICY}." in n)
    assert "eval_accuracy" in summary


# ---------------------------------------------------------------------------------------------------------------
# The recipes from the command line (slow: subprocesses)


def test_recipe_chains_from_the_sft_run_and_resumes_after_a_kill(tmp_path, monkeypatch):
    """``recipes/grpo.py --init SFT`` from the command line; then killed (SIGKILL) once checkpoint-2 is complete and
    resumed: every iteration's figures, the rollouts and the final adapter equal the uninterrupted run's; and
    ``--init`` of the GRPO run (its policy adapter) chains on to recipes/rloo.py."""
    from recipe_processes import checkpoint_complete, run_to_end, run_until
    from safetensors.torch import load_file

    from finetune.runs import read_metrics

    # the recipes import this module for its verifier (recipe_processes puts only tests/ on their path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    sft = make_sft_run(tmp_path / "sft")
    args = [*QUICK, "--data.eval=null", "--grpo.num_iterations=4", "--grpo.save_every=2",
            "--grpo.save_total_limit=null"]
    recipe = ROOT / "recipes" / "grpo.py"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    output = run_to_end([sys.executable, recipe, "--init", sft, "--output_dir", straight, *args])
    assert "GRPO" in output and "verifier accuracy" in output
    run_until([sys.executable, recipe, "--init", sft, "--output_dir", killed, *args], checkpoint_complete(killed, 2))
    assert not (killed / "summary.json").exists()
    output = run_to_end([sys.executable, recipe, "--init", sft, "--output_dir", killed, *args, "--resume"])
    assert "checkpoint-2 (iteration 2 of 4)" in output
    rows, expected = read_metrics(killed), read_metrics(straight)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    figures = ("score", "kl", "policy_loss", "kl_loss", "entropy", "clip_fraction", "optimizer_steps")
    for row, want in zip(rows, expected):
        assert {k: row[k] for k in figures} == pytest.approx({k: want[k] for k in figures}, rel=1e-6, abs=1e-9)
    assert (killed / "rollouts.jsonl").read_text() == (straight / "rollouts.jsonl").read_text()
    a, b = load_file(killed / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert all(a[k].allclose(b[k], rtol=1e-5, atol=1e-7) for k in a)

    chained = tmp_path / "rloo"
    run_to_end([sys.executable, ROOT / "recipes" / "rloo.py", "--init", straight, "--output_dir", chained, *QUICK,
                "--data.eval=null", "--grpo.num_iterations=1"])
    assert json.loads((chained / "summary.json").read_text())["init"] == str(straight)


def test_two_processes_roll_out_every_prompt_once_with_its_whole_group(tmp_path, monkeypatch):
    """Under 2 CPU processes (DDP over the policy adapter) each process samples its share of the prompts, G samples
    each: the gathered rollouts hold every (prompt, sample) of the iteration's schedule exactly once."""
    from factories import launch_recipe

    from finetune.prompts import prompt_schedule

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    sft = make_sft_run(tmp_path / "sft")
    out = tmp_path / "grpo"
    proc = launch_recipe("grpo.py", 2, ["--init", str(sft), "--output_dir", str(out), *QUICK, "--data.max_train_samples=10",
                                        "--grpo.rollout_batch_size=6", "--grpo.mini_batch_size=6",
                                        "--grpo.num_iterations=2"])
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    for iteration in (1, 2):
        mine = [(r["prompt_index"], r["sample"]) for r in rollouts if r["iteration"] == iteration]
        assert sorted(mine) == sorted((p, k) for p in prompt_schedule(10, iteration - 1, 6, seed=42) for k in range(4))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert json.loads((out / "summary.json").read_text())["num_processes"] == 2
    assert proc.stdout.count("KL to reference") == 1, "the results table comes from the main process only"
