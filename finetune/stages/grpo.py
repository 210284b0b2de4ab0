"""GRPO and RLOO from an SFT run, without a critic, on accelerate: policy, reference and (optionally) reward as
adapters on one base (``finetune.roles``, as PPO's, less the value role).

- ``policy``: the SFT adapter, trainable;
- ``reference``: the same SFT adapter, frozen. The KL anchor is the SFT model, never the raw base with the adapters
  switched off (TRL's ``GRPOTrainer``/``RLOOTrainer`` given a PEFT model and no ``ref`` adapter take exactly that:
  ``use_adapter(model, None)``, the base);
- ``reward``: the reward run's adapter and head, frozen, when ``score.reward_model`` is set (a verifier can be used
  instead or added to it, ``finetune.scorers``).

One iteration is five named phases, PPO's minus the critic:

1. ``finetune.rollout.generate_trajectory`` (the library's, PPO's too): each process samples ``sampling.num_samples``
   (G) responses for each of its share of the iteration's prompts, a prompt's whole group on one process, scores
   them, and computes the rollout policy's and the reference's per-token log-probs without gradients.
2. :func:`group_advantages_phase`: with ``grpo.kl_mode=reward`` the score less ``kl_coef`` times the response's
   summed ``k1`` KL (``sequence_kl_penalty``); then one advantage per response from the rest of its group:
   GRPO's ``group_advantages`` (Shao et al. 2024, https://arxiv.org/abs/2402.03300) or RLOO's
   ``leave_one_out_advantages`` (Ahmadian et al. 2024, https://arxiv.org/abs/2402.14740). A group needs no other
   process's responses, so N processes compute what one would.
3. :func:`policy_epochs`: ``grpo.epochs`` passes of shuffled minibatches; each one forward of the policy, the clipped
   ``grpo_policy_loss`` (plus ``kl_coef`` times the per-token ``k3`` KL with ``grpo.kl_mode=loss``), backward,
   gradient clipping and an AdamW step.
4. :func:`iteration_figures` and :func:`log_iteration`: the figures averaged over processes, the row to
   ``metrics.jsonl`` and TensorBoard (``finetune.training_loop.MetricsLog``) and the responses to ``rollouts.jsonl``.
5. Every ``grpo.save_every`` iterations a ``checkpoint-N/`` (``finetune.training_loop.save_checkpoint``): the policy
   adapter, the optimizer, scheduler and RNG states, the minibatch shuffle; ``--resume`` continues from the newest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..config import GRPOParams, GRPORunConfig, RLOORunConfig
from ..evaluate import load_callable, verifier_accuracy
from ..losses import group_advantages, grpo_policy_loss, leave_one_out_advantages, sequence_kl_penalty
from ..models import backbone_hidden_states, resolve_model, save_adapter
from ..prompts import load_rl_data, prompt_schedule
from ..roles import POLICY, AdapterRewardModel, Roles, load_roles
from ..rollout import (
    Rollout,
    generate_trajectory,
    policy_logprobs,
    resolve_rl_init,
    response_entropy,
    rewind_rollouts,
    rollouts_size,
    write_rollouts,
)
from ..rollout import iteration_figures as rollout_iteration_figures
from ..runs import latest_complete_checkpoint, stop_on_non_finite, two_column_table
from ..scorers import build_scorer
from ..templates import stop_token_ids
from ..training_loop import MetricsLog, load_checkpoint, save_checkpoint
from .scaffold import Stage, StageData, StageRun, Trained, run_stage


def method_name(cfg: GRPORunConfig) -> str:
    """``GRPO`` or ``RLOO``, after the advantage the run uses."""
    return "RLOO" if cfg.grpo.advantage == "leave_one_out" else "GRPO"


class Policy(torch.nn.Module):
    """The trainable part as one module, so accelerate can prepare it (DDP under several processes): a forward runs
    the backbone with the ``policy`` adapter and returns its last hidden states."""

    def __init__(self, roles: Roles):
        super().__init__()
        self.model = roles.model
        self._roles = roles

    def forward(self, input_ids, attention_mask):
        self._roles.use(POLICY)
        return backbone_hidden_states(self.model, input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# Phase 2: advantages from the group


@dataclasses.dataclass
class GroupAdvantages:
    """Phase 2's ``[N]`` tensors, one entry per response."""

    rewards: torch.Tensor
    """The score, less ``kl_coef`` times ``kl`` with ``grpo.kl_mode=reward``."""
    kl: torch.Tensor
    """The response's summed per-token ``k1`` KL to the reference (``log pi - log ref``) at rollout time."""
    advantages: torch.Tensor
    equal_groups: float
    """The fraction of groups whose rewards are all equal: their advantages are 0, they teach nothing."""


def group_advantages_phase(rollout: Rollout, params: GRPOParams, group_size: int) -> GroupAdvantages:
    """Phase 2: the rewards (the KL taken off with ``kl_mode=reward``) and one advantage per response from its
    group (``group``: GRPO's, ``leave_one_out``: RLOO's)."""
    mask = rollout.mask.float()
    kl_coef = params.kl_coef if params.kl_mode == "reward" else 0.0
    rewards, kl = sequence_kl_penalty(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    if params.advantage == "group":
        advantages = group_advantages(rewards, group_size, scale=params.scale_advantages)
    else:
        advantages = leave_one_out_advantages(rewards, group_size)
    grouped = rewards.view(-1, group_size)
    equal = (grouped == grouped[:, :1]).all(dim=1).float().mean().item() if len(rewards) else 0.0
    return GroupAdvantages(rewards, kl, advantages, equal)


# ---------------------------------------------------------------------------------------------------------------
# Phase 3: the updates


UPDATE_STATS = ("policy_loss", "clip_fraction", "kl_loss", "approx_kl", "entropy", "grad_norm")


@dataclasses.dataclass
class Optimization:
    """What phase 3 changes: the prepared :class:`Policy`, its optimizer and scheduler, the parameters they hold
    (for gradient clipping), the minibatch shuffle, and the optimizer steps taken so far."""

    accelerator: object
    module: torch.nn.Module
    optimizer: object
    scheduler: object
    params: list[torch.nn.Parameter]
    shuffle: torch.Generator
    steps: int = 0


def policy_epochs(opt: Optimization, rollout: Rollout, adv: GroupAdvantages, lm_head_weight, params: GRPOParams,
                  temperature: float) -> dict[str, list[float]]:
    """Phase 3: ``params.epochs`` passes of shuffled minibatches, each one forward of the policy,
    ``grpo_policy_loss`` (its KL term only with ``kl_mode=loss``), backward, gradient clipping and an optimizer
    step. Returns each minibatch's figures by name (``UPDATE_STATS``)."""
    stats: dict[str, list[float]] = {k: [] for k in UPDATE_STATS}
    n, device, mask = len(rollout.scores), opt.accelerator.device, rollout.mask.float()
    kl_coef = params.kl_coef if params.kl_mode == "loss" else 0.0
    opt.module.train()
    for _ in range(params.epochs):
        order = torch.randperm(n, generator=opt.shuffle)
        for start in range(0, n, params.mini_batch_size):
            idx = order[start : start + params.mini_batch_size]
            hidden = opt.module(rollout.input_ids[idx].to(device), rollout.attention_mask[idx].to(device))
            mb_mask = mask[idx].to(device)
            support = None if rollout.support is None else rollout.support[idx].to(device)
            logprobs = policy_logprobs(hidden, lm_head_weight, rollout.labels[idx].to(device), temperature, support)
            loss, clip_fraction, kl, approx_kl = grpo_policy_loss(
                logprobs, rollout.logprobs[idx].to(device), rollout.ref_logprobs[idx].to(device),
                adv.advantages[idx].to(device), mb_mask, params.clip_range, kl_coef,
            )
            opt.accelerator.backward(loss)
            grad_norm = opt.accelerator.clip_grad_norm_(opt.params, params.max_grad_norm)
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad()
            opt.steps += 1
            with torch.no_grad():
                entropy = response_entropy(hidden, lm_head_weight, mb_mask, temperature, support)
            for key, value in zip(UPDATE_STATS, (loss, clip_fraction, kl, approx_kl, entropy, grad_norm)):
                stats[key].append(float(torch.as_tensor(value).detach()))
    return stats


# ---------------------------------------------------------------------------------------------------------------
# Phase 4: figures and logs


def iteration_figures(rollout: Rollout, adv: GroupAdvantages, stats: dict[str, list[float]], accelerator):
    """Phase 4's figures of one iteration (``finetune.rollout.iteration_figures``, collectives: every process calls
    it) with this stage's reward and KL."""
    return rollout_iteration_figures(rollout, {
        "reward": adv.rewards.mean().item(),
        "kl": adv.kl.mean().item(),
        "advantage_abs": adv.advantages.abs().mean().item(),
        "equal_groups": adv.equal_groups,
    }, stats, accelerator)


def log_iteration(log: MetricsLog, output_dir: Path, row: dict, records: list[dict], num_iterations: int) -> None:
    """Phase 4's output (main process): the row to ``metrics.jsonl`` and TensorBoard, the responses to
    ``rollouts.jsonl``, and one printed line."""
    log.log(row)
    write_rollouts(output_dir, row["step"], records)
    print(f"iteration {row['step']}/{num_iterations}: score {row['score']:.3f} kl {row['kl']:.3f} "
          f"policy loss {row['policy_loss']:.4f} clip {row['clip_fraction']:.3f} entropy {row['entropy']:.3f} "
          f"equal groups {row['equal_groups']:.2f} length {row['response_length']:.1f}")


# ---------------------------------------------------------------------------------------------------------------
# The run


def resolve(cfg: GRPORunConfig):
    """Check the SFT run and the reward run against this run's base and template (``finetune.run_dir``); a
    full-weights SFT run becomes the base and the policy a new ``adapter`` on it (the reference's stays zero)."""
    return resolve_rl_init(cfg, "grpo")


def resolve_init(cfg: GRPORunConfig) -> GRPORunConfig:
    """:func:`resolve`'s config, for callers that build the roles themselves."""
    return resolve(cfg)[0]


def load_data(cfg: GRPORunConfig, tokenizer, template) -> StageData:
    """The prompts and (with a verifier) the eval conversations (``finetune.prompts.load_rl_data``)."""
    data = load_rl_data(cfg, tokenizer, template)
    return StageData((data.prompts, data.skipped, data.eval_conversations), data.report, data.loads)


def run(cfg: GRPORunConfig) -> dict:
    """Train the policy with GRPO or RLOO, evaluate and save; returns the summary also written to ``summary.json``."""
    return train(cfg)[0]


def train(cfg: GRPORunConfig) -> tuple[dict, Roles]:
    """:func:`run`, also returning the trained roles (the tests inspect the adapters after training)."""
    trained = run_stage(cfg, RLOO_STAGE if isinstance(cfg, RLOORunConfig) else STAGE)
    return trained.summary, trained.model


def train_policy(run: StageRun) -> Trained:
    """The GRPO/RLOO run inside the stage scaffold: roles, optimizer, the iterations, the final evaluation."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    cfg, state, output_dir, tokenizer, template = run.cfg, run.state, run.output_dir, run.tokenizer, run.template
    params, group_size = cfg.grpo, cfg.sampling.num_samples
    prompts, skipped, eval_convs = run.data
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    resume_from = latest_complete_checkpoint(output_dir) if cfg.resume else None
    if cfg.resume and not resume_from and main:  # nothing to resume: start afresh (metrics.jsonl is rewound)
        rewind_rollouts(output_dir, 0)

    roles = load_roles(cfg, accelerator.device, value=False)
    scorer = build_scorer(cfg.score, AdapterRewardModel(roles, tokenizer, template) if cfg.score.reward_model else None)
    stop_ids = stop_token_ids(template, tokenizer)
    lm_head_weight = roles.model.get_base_model().get_output_embeddings().weight
    temperature = cfg.sampling.temperature
    verifier = load_callable(cfg.eval.verifier) if eval_convs else None

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name), "init": cfg.init,
                     "method": method_name(cfg), "advantage": params.advantage, "kl_mode": params.kl_mode,
                     "reward_model": cfg.score.reward_model, "scorer": scorer.name,
                     "num_processes": accelerator.num_processes}
    if verifier and cfg.eval.before_training and not resume_from:  # a resumed run has it from its checkpoint
        roles.use(POLICY)
        before = verifier_accuracy(roles.model, tokenizer, template, eval_convs, verifier, cfg.eval.max_new_tokens,
                                   cfg.eval.batch_size)
        summary["init_eval_accuracy"] = before.accuracy
        if main:
            print(f"verifier accuracy of the SFT init: {before.accuracy:.3f} on {before.num_prompts} eval prompts")

    policy = Policy(roles)
    trainable_params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=params.learning_rate, weight_decay=params.weight_decay)
    responses_per_process = params.rollout_batch_size // accelerator.num_processes * group_size
    total_steps = params.num_iterations * params.epochs * math.ceil(responses_per_process / params.mini_batch_size)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=int(params.warmup_ratio * total_steps))
    policy, optimizer, scheduler = accelerator.prepare(policy, optimizer, scheduler)
    shuffle = torch.Generator().manual_seed(params.seed + accelerator.process_index)
    trainable = accelerator.unwrap_model(policy)

    opt = Optimization(accelerator, policy, optimizer, scheduler, trainable_params, shuffle)
    start_iteration, previous_seconds = 0, 0.0
    if resume_from:
        progress = load_checkpoint(resume_from, accelerator, trainable, shuffle)
        start_iteration, opt.steps = progress["iteration"], progress["optimizer_steps"]
        previous_seconds = progress["train_seconds"]
        summary.update(progress["summary"])
        if main:
            rewind_rollouts(output_dir, progress["rollouts_bytes"])
            print(f"resuming from {resume_from} (iteration {start_iteration} of {params.num_iterations})")
        state.wait_for_everyone()
    log = MetricsLog(output_dir, main)
    started = time.perf_counter()
    for iteration in range(start_iteration, params.num_iterations):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in prompt_schedule(len(prompts), iteration, params.rollout_batch_size, params.seed)]
        seed = cfg.sampling.seed + iteration * accelerator.num_processes + accelerator.process_index
        rollout = generate_trajectory(roles, tokenizer, batch, stop_ids, cfg.sampling, scorer, seed, lm_head_weight,
                                      params.mini_batch_size, params.missing_stop_penalty)
        adv = group_advantages_phase(rollout, params, group_size)
        stats = policy_epochs(opt, rollout, adv, lm_head_weight, params, temperature)

        figures, records, response_tokens = iteration_figures(rollout, adv, stats, accelerator)
        seconds = time.perf_counter() - t0
        row = {"step": iteration + 1, "optimizer_steps": opt.steps, "learning_rate": scheduler.get_last_lr()[0],
               "loss": figures["policy_loss"], **figures, "iteration_seconds": seconds,
               "tokens_per_second": response_tokens / seconds}
        if main:
            log_iteration(log, output_dir, row, records, params.num_iterations)
        stop_on_non_finite(figures, iteration + 1, output_dir, main, "grpo.learning_rate")

        done = iteration + 1
        if params.save_every and (done % params.save_every == 0 or done == params.num_iterations):
            progress = {"iteration": done, "optimizer_steps": opt.steps,
                        "train_seconds": previous_seconds + time.perf_counter() - started,
                        "summary": {k: summary[k] for k in ("init_eval_accuracy",) if k in summary},
                        "rollouts_bytes": rollouts_size(output_dir) if main else 0}
            save_checkpoint(output_dir, done, accelerator, trainable, shuffle, progress, params.save_total_limit)
    train_seconds = previous_seconds + time.perf_counter() - started
    log.close()

    last = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1]) if main else {}
    summary.update(iterations=params.num_iterations, optimizer_steps=opt.steps, train_seconds=train_seconds,
                   skipped_prompts=len(skipped),
                   **{f"final_{k}": last[k] for k in ("score", "kl", "policy_loss", "kl_loss", "entropy",
                                                       "response_length", "equal_groups") if k in last})
    if verifier:
        roles.use(POLICY)
        after = verifier_accuracy(roles.model, tokenizer, template, eval_convs, verifier, cfg.eval.max_new_tokens,
                                  cfg.eval.batch_size)
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples

    return Trained(summary, lambda directory: save_adapter(roles.model, POLICY, directory) if main else None,
                   roles.model.get_base_model().config, roles)


STAGE = Stage("grpo", load_data, train_policy, resolve=resolve, seed=lambda cfg: cfg.grpo.seed)
RLOO_STAGE = dataclasses.replace(STAGE, name="rloo")


def results_table(summary: dict) -> str:
    """The SFT model against the trained policy, as the recipe prints it at the end."""
    rows = [("verifier accuracy", summary.get("init_eval_accuracy"), summary.get("eval_accuracy"))]
    if "final_kl" in summary:
        rows.append(("KL to reference", 0.0, summary["final_kl"]))
    return two_column_table(("SFT", summary.get("method", "GRPO")), rows)
