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
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4)
PROMPTS, SAMPLES, NEW_TOKENS = 2, 1, 8  # small: a 7-8B model's weights dwarf its activations (checkpointed)


def rss_mb() -> float:
    """Current resident memory of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_runs(directory: Path) -> dict:
    """A base model directory, a stand-in SFT run and a stand-in reward run on it."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from finetune.config import AdapterConfig, ModelConfig, RewardConfig, SFTConfig
    from finetune.models import load_tokenizer, lora_config
    from finetune.runs import write_config
    from finetune.stages.reward import reward_lora_config
    from finetune.templates import save_with_template
    from finetune.tiny import tiny_model_dir

    tiny = json.loads((tiny_model_dir() / "config.json").read_text())
    config = LlamaConfig(**{**{k: tiny[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
                                                    "max_position_embeddings", "rms_norm_eps")}, **SHAPE})
    torch.manual_seed(0)
    base_dir, sft_dir, reward_dir = directory / "base", directory / "sft", directory / "reward"
    LlamaForCausalLM(config).save_pretrained(base_dir)
    tokenizer = load_tokenizer("tiny")
    tokenizer.save_pretrained(base_dir)
    model_cfg = ModelConfig(name=str(base_dir))
    adapter = AdapterConfig(r=16, alpha=32, dropout=0.0)

    sft = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config(adapter))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    sft.save_pretrained(sft_dir)
    write_config(sft_dir, SFTConfig(output_dir=str(sft_dir), model=model_cfg, adapter=adapter))

    classifier = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward = get_peft_model(classifier, reward_lora_config(adapter))
    reward.save_pretrained(reward_dir)
    save_with_template(tokenizer, "llama3", reward_dir)
    write_config(reward_dir, RewardConfig(output_dir=str(reward_dir), model=model_cfg, adapter=adapter))
    n_params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    return {"base": str(base_dir), "sft": str(sft_dir), "reward": str(reward_dir), "base_parameters": n_params}


def ppo_args(runs: dict, out: Path) -> list[str]:
    return ["--init", runs["sft"], "--model.name", runs["base"], "--output_dir", str(out), "--overwrite",
            f"--score.reward_model={runs['reward']}", "--score.verifier=null", "--eval.verifier=null",
            f"--data.max_train_samples={PROMPTS}", "--data.eval=null", f"--sampling.num_samples={SAMPLES}",
            f"--sampling.max_new_tokens={NEW_TOKENS}", "--ppo.num_iterations=1",
            f"--ppo.rollout_batch_size={PROMPTS}", f"--ppo.mini_batch_size={PROMPTS * SAMPLES}", "--ppo.ppo_epochs=1"]


def arm_shared(runs: dict, out: Path, device: str) -> None:
    from finetune.config import PPOConfig, parse_args
    from finetune.stages import ppo

    ppo.train(parse_args(PPOConfig, ppo_args(runs, out)))


def arm_separate(runs: dict, out: Path, device: str) -> None:
    """The same iteration with four models (no shared base)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.config import PPOConfig, parse_args
    from finetune.data import load_conversations
    from finetune.generation import SamplingConfig, generate
    from finetune.logprobs import masked_whiten, token_logprobs
    from finetune.losses import gae, per_token_rewards, ppo_policy_loss, ppo_value_loss
    from finetune.models import load_sequence_classifier, load_tokenizer
    from finetune.stages.ppo import build_rollout
    from finetune.stages.rejection_sampling import load_prompts
    from finetune.templates import get_template, render, stop_token_ids

    cfg = parse_args(PPOConfig, ppo_args(runs, out))
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
                           SamplingConfig(NEW_TOKENS, 1.0, seed=0), 64)
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
    import torch
    import torch.utils.tensorboard  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import finetune.scoring  # noqa: F401
    import finetune.stages.ppo  # noqa: F401
    import finetune.stages.reward  # noqa: F401

    runs = json.loads(runs_json)
    torch.manual_seed(0)
    before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    (arm_shared if arm == "shared" else arm_separate)(runs, Path(out), device)
    result = {"arm": arm, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(),
              "peak_mb": peak_rss_mb() - before}
    if device.startswith("cuda"):
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


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
        arms = {}
        for arm in ("shared", "separate"):
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", arm, json.dumps(runs),
                                   str(tmp / f"out-{arm}")], env=env, capture_output=True, text=True, cwd=ROOT)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{arm} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
            arms[arm] = json.loads(lines[-1][len("RESULT "):])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {
        "device": args.device,
        "measure": "peak CUDA memory allocated" if args.device.startswith("cuda") else
                   "peak resident memory of the process minus its resident memory before loading",
        "model": f"LLaMA {SHAPE}, {runs['base_parameters'] / 1e6:.0f}M parameters, fp32; LoRA r=16 on every linear",
        "iteration": f"{PROMPTS} prompts x {SAMPLES} samples, {NEW_TOKENS} new tokens, one update",
        "torch": torch.__version__,
        "arms": arms,
        "ratio": arms["shared"]["peak_mb"] / arms["separate"]["peak_mb"],
        "goal": "<= 0.5",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"ppo_memory_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
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
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
