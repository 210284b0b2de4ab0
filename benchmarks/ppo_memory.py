"""PPO peak memory: one shared base with four adapters (``finetune.stages.ppo``) against four separate models.

    python benchmarks/ppo_memory.py                 # CPU: peak resident memory of each arm's process
    python benchmarks/ppo_memory.py --device cuda   # GPU: peak allocated CUDA memory

A LLaMA big enough for its weights to dominate the measurement (8 layers, hidden 768: 52M parameters, fp32, the
tiny tokenizer's 1024-token vocabulary; built from a seeded config, no download) gets a stand-in SFT run (a LoRA
adapter) and a stand-in reward run (LoRA adapter + scalar head). Each arm runs in its own process and does one PPO
iteration on the same prompts: sample, score with the reward model, log-probs of policy and reference, values,
one clipped policy + value update.

- ``shared``: ``finetune.stages.ppo.train`` itself: one base, adapters ``policy``, ``reference``, ``value``,
  ``reward``.
- ``separate``: four models, as a PPO without shared adapters holds them: policy (base + SFT adapter, trainable),
  reference (another base + SFT adapter, frozen), value (a sequence-classifier base + reward adapter and head,
  trainable), reward (another of those, frozen); the same losses from ``finetune.losses``.

Peak memory counts from just before the models are loaded (imports excluded). The rollout is kept small (2 prompts,
8 new tokens) so that weights dominate, as they do for a 7-8B model trained with activation checkpointing; with a
large rollout on this small model the activations of the two backbone passes with gradients (policy and value),
the same in both arms, take over and the ratio moves towards 1. Goal: shared <= 0.5 x separate.
Results go to ``benchmarks/results/ppo_memory_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from peak_memory import (
    LORA,
    build_base_and_sft,
    measure,
    measure_description,
    model_description,
    run_arm,
    write_results,
)

PROMPTS, SAMPLES, NEW_TOKENS = 2, 1, 8  # small: a 7-8B model's weights dwarf its activations (checkpointed)


def build_runs(directory: Path) -> dict:
    """The shared base and stand-in SFT run (``peak_memory``), and a stand-in reward run on the base."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from finetune.config import AdapterConfig, ModelConfig, RewardRunConfig
    from finetune.models import load_tokenizer
    from finetune.runs import write_config
    from finetune.stages.reward import reward_lora_config
    from finetune.templates import save_with_template

    runs = build_base_and_sft(directory)
    base_dir, reward_dir = Path(runs["base"]), directory / "reward"
    tokenizer = load_tokenizer(str(base_dir))
    adapter = AdapterConfig(**LORA)
    classifier = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward = get_peft_model(classifier, reward_lora_config(adapter))
    reward.save_pretrained(reward_dir)
    save_with_template(tokenizer, "llama3", reward_dir)
    write_config(reward_dir, RewardRunConfig(output_dir=str(reward_dir), model=ModelConfig(name=str(base_dir)),
                                          adapter=adapter))
    return {**runs, "reward": str(reward_dir)}


def ppo_args(runs: dict, out: Path) -> list[str]:
    return ["--init", runs["sft"], "--model.name", runs["base"], "--output_dir", str(out), "--overwrite",
            f"--score.reward_model={runs['reward']}", "--score.verifier=null", "--eval.verifier=null",
            f"--data.max_train_samples={PROMPTS}", "--data.eval=null", f"--sampling.num_samples={SAMPLES}",
            f"--sampling.max_new_tokens={NEW_TOKENS}", "--ppo.num_iterations=1",
            f"--ppo.rollout_batch_size={PROMPTS}", f"--ppo.mini_batch_size={PROMPTS * SAMPLES}", "--ppo.ppo_epochs=1"]


def arm_shared(runs: dict, out: Path, device: str) -> None:
    from finetune.config import PPORunConfig, parse_args
    from finetune.stages import ppo

    ppo.train(parse_args(PPORunConfig, ppo_args(runs, out)))


def arm_separate(runs: dict, out: Path, device: str) -> None:
    """The same iteration with four models (no shared base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.config import PPORunConfig, parse_args
    from finetune.data import load_conversations
    from finetune.generation import Decoding, generate
    from finetune.logprobs import masked_whiten, token_logprobs
    from finetune.losses import gae, per_token_rewards, ppo_policy_loss, ppo_value_loss
    from finetune.models import load_sequence_classifier, load_tokenizer
    from finetune.prompts import load_prompts
    from finetune.rollout import build_rollout
    from finetune.templates import get_template, render, stop_token_ids

    cfg = parse_args(PPORunConfig, ppo_args(runs, out))
    tokenizer = load_tokenizer(runs["base"])
    template = get_template("llama3", tokenizer)
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["sft"], is_trainable=True)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["base"]), runs["sft"]).eval()
    value = PeftModel.from_pretrained(load_sequence_classifier(cfg.model), runs["reward"], is_trainable=True)
    reward = PeftModel.from_pretrained(load_sequence_classifier(cfg.model, for_training=False), runs["reward"]).eval()
    for m in (value, reward):
        m.config.pad_token_id = tokenizer.pad_token_id
    for m in (policy, reference, value, reward):
        m.to(device)

    convs = load_conversations(cfg.data.train, limit=PROMPTS)
    prompts, _ = load_prompts(convs, template, tokenizer, 192)
    prompt_ids = [p.ids for p in prompts for _ in range(SAMPLES)]
    completions = generate(policy, tokenizer, prompt_ids, stop_token_ids(template, tokenizer),
                           Decoding(NEW_TOKENS, 1.0, seed=0), 64)
    with torch.no_grad():
        convs_scored = [[*p.messages, {"role": "assistant", "content": c.text}]
                        for i, p in enumerate(prompts) for c in completions[i * SAMPLES : (i + 1) * SAMPLES]]
        ids = [render(template, c, tokenizer)[0] for c in convs_scored]
        width = max(len(i) for i in ids)
        batch = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i in ids], device=device)
        scores = reward(input_ids=batch, attention_mask=(batch != tokenizer.pad_token_id).long()).logits[:, 0].cpu()
    responses = [c.token_ids + ([c.stop_id] if c.stopped else []) for c in completions]
    rollout = build_rollout(prompt_ids, responses, tokenizer.pad_token_id)
    ids, attn, labels, mask = (t.to(device) for t in (rollout.input_ids, rollout.attention_mask, rollout.labels,
                                                      rollout.mask.float()))
    with torch.no_grad():
        old = token_logprobs(policy(input_ids=ids, attention_mask=attn).logits[:, :-1], labels)
        ref = token_logprobs(reference(input_ids=ids, attention_mask=attn).logits[:, :-1], labels)
        old_values = _values(value, ids, attn)
    rewards, _ = per_token_rewards(scores.to(device), old, ref, mask, 0.05)
    advantages, returns = gae(rewards, old_values, mask, 1.0, 0.95)
    advantages = masked_whiten(advantages, mask)
    params = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    logprobs = token_logprobs(policy(input_ids=ids, attention_mask=attn).logits[:, :-1], labels)
    loss = ppo_policy_loss(logprobs, old, advantages, mask, 0.2)[0] + 0.1 * ppo_value_loss(
        _values(value, ids, attn), old_values, returns, mask, 0.2)[0]
    loss.backward()
    optimizer.step()


def _values(value_model, ids, attn):
    """A sequence classifier's head at every position (what a value model gives PPO)."""
    hidden = value_model.get_base_model().model(input_ids=ids, attention_mask=attn).last_hidden_state
    return value_model.get_base_model().score(hidden).squeeze(-1)[:, :-1]


def child(arm: str, runs_json: str, out: str, device: str) -> None:
    # Both arms import the same modules before the baseline is taken, so imports do not count in either.
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import finetune.reward_model  # noqa: F401
    import finetune.stages.ppo  # noqa: F401
    import finetune.stages.reward  # noqa: F401

    runs = json.loads(runs_json)
    measure(arm, lambda: (arm_shared if arm == "shared" else arm_separate)(runs, Path(out), device), device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "RUNS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.device)
        return
    import torch

    tmp = Path(tempfile.mkdtemp(prefix="ppo_memory_"))
    try:
        runs = build_runs(tmp)
        arms = {arm: run_arm(__file__, ["--device", args.device, "--child", arm, json.dumps(runs),
                                        str(tmp / f"out-{arm}")])
                for arm in ("shared", "separate")}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "device": args.device,
        "measure": measure_description(args.device),
        "model": model_description(runs["base_parameters"]),
        "iteration": f"{PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, one update",
        "torch": torch.__version__,
        "arms": arms,
        "ratio": arms["shared"]["peak_mb"] / arms["separate"]["peak_mb"],
        "goal": "<= 0.5",
    }
    text = "\n".join([
        f"PPO peak memory, {result['model']}, {result['iteration']} ({result['measure']})",
        "",
        "| arm | peak MB |",
        "|---|---:|",
        f"| one base, four adapters (finetune.stages.ppo) | {arms['shared']['peak_mb']:.0f} |",
        f"| four separate models | {arms['separate']['peak_mb']:.0f} |",
        "",
        f"Shared / separate: **{result['ratio']:.2f}** (goal {result['goal']}).",
    ])
    write_results("ppo_memory", args.device, result, text)
    print(text)


if __name__ == "__main__":
    main()
