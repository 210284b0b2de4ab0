"""PPO from an SFT run with a critic, on accelerate: policy, reference, value and reward as adapters on one base.

The base (bf16/fp32, or 4-bit NF4 for QLoRA) is loaded once. Every role is a named PEFT adapter on it
(``finetune.roles``, shared with GRPO/RLOO), and switching roles is ``activate_adapter`` (PEFT's ``set_adapter``,
keeping the trainable set fixed):

- ``policy``: the SFT adapter, trainable;
- ``reference``: the same SFT adapter, frozen (the KL anchor is the SFT model, never the raw base);
- ``value``: an adapter plus a scalar head (``torch.nn.Linear(hidden, 1)`` on the last hidden state), trainable; it
  starts from the reward model's adapter and head when one is given, else from the SFT adapter and a zero head;
- ``reward``: the reward run's adapter and head, frozen, when ``score.reward_model`` is set; a verifier (any
  ``module:function``) can be used instead or added to it (``finetune.scorers``).

One iteration (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the conventions of "The N Implementation
Details of RLHF with PPO", Huang et al. 2024) is five named phases, as torchtune's PPO recipe names them:

1. :func:`generate_trajectory`, the rollout: each process samples ``sampling.num_samples`` responses for each of
   its share of the iteration's prompts (``finetune.prompts.prompt_schedule``, ``finetune.rollout.sample_groups``)
   and scores them; then, without gradients, the rollout policy's, the reference's and the value head's per-token
   log-probs and values are computed (``finetune.rollout.score_rollout``; the phase is the library's
   ``finetune.rollout.generate_trajectory``, which GRPO/RLOO run too).
2. :func:`rewards_and_advantages`: per-token KL penalty against the reference plus the score at the last token
   (``per_token_rewards``), ``gae`` advantages and returns, advantages whitened (``masked_whiten``) with the mean
   and variance of every process's response tokens together, so N processes whiten as one process would.
3. :func:`ppo_epochs`, the updates: ``ppo_epochs`` passes of shuffled minibatches; each is one forward of the
   policy and one of the value adapter (:class:`PolicyAndValue`, the module accelerate prepares),
   ``ppo_policy_loss`` + ``value_loss_coef * ppo_value_loss``, backward, gradient clipping, an AdamW step.
4. :func:`iteration_figures` and :func:`log_iteration`: the figures averaged over processes, the KL controller
   updated with the rollout's KL, the row written to ``metrics.jsonl`` and TensorBoard
   (``finetune.training_loop.MetricsLog``, as SFT and DPO write theirs) and the responses to ``rollouts.jsonl``.
5. Every ``ppo.save_every`` iterations a ``checkpoint-N/`` (``finetune.training_loop.save_checkpoint``): the
   trainable weights, ``Accelerator.save_state``'s optimizer, scheduler and every process's RNG states, the
   minibatch shuffle, the KL coefficient and the metrics so far, staged and renamed into place once complete.
   ``--resume`` continues from the newest complete one exactly as the run would have gone on (on CPU: the same
   figures at every later iteration).

Entropies and log-probs are computed from the last hidden states a chunk of positions at a time
(``chunked_token_logprobs``, ``chunked_entropy``): the ``[N, T, V]`` float32 logits never exist.

Dropout is switched off (every dropout's p set to 0, so activation checkpointing, which acts in train mode, still
can), and at the first minibatch the policy's log-probs equal the rollout's: the ratio is exactly 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ..config import PPOParams, PPORunConfig, to_dict
from ..evaluate import load_callable, verifier_accuracy
from ..logprobs import masked_whiten
from ..losses import AdaptiveKLController, FixedKLController, gae, per_token_rewards, ppo_policy_loss, ppo_value_loss
from ..models import backbone_hidden_states, resolve_model, save_adapter
from ..prompts import Prompt, load_rl_data, prompt_schedule
from ..roles import POLICY, REFERENCE, REWARD, VALUE, AdapterRewardModel, Roles, load_roles, scalar_head  # noqa: F401
from ..rollout import (  # noqa: F401  (score_rollout, policy_logprobs, response_entropy: PPO's names too)
    Rollout,
    policy_logprobs,
    resolve_rl_init,
    response_entropy,
    rewind_rollouts,
    rollouts_size,
    score_rollout,
    write_rollouts,
)
from ..rollout import generate_trajectory as shared_generate_trajectory
from ..rollout import iteration_figures as rollout_iteration_figures
from ..runs import latest_complete_checkpoint, stop_on_non_finite, two_column_table
from ..scorers import build_scorer
from ..templates import stop_token_ids
from ..training_loop import MetricsLog, accelerate_trackers, load_checkpoint, process_sum, save_checkpoint
from .scaffold import Stage, StageData, StageRun, Trained, run_stage

TRAINABLE = (POLICY, VALUE)
"""The adapters the optimizer holds; ``reference`` and ``reward`` never train."""


# ---------------------------------------------------------------------------------------------------------------
# The roles on one base (``finetune.roles``: ``load_roles`` with the value role)


class PolicyAndValue(torch.nn.Module):
    """The trainable part as one module, so accelerate can prepare it (DDP under several processes): a forward
    runs the backbone with the ``policy`` adapter (returning its last hidden states) and with the ``value`` adapter
    (returning the value head's outputs)."""

    def __init__(self, roles: Roles):
        super().__init__()
        self.model = roles.model
        self.value_head = roles.value_head
        self._roles = roles

    def forward(self, input_ids, attention_mask):
        self._roles.use(POLICY)
        policy_hidden = backbone_hidden_states(self.model, input_ids, attention_mask)
        self._roles.use(VALUE)
        values = scalar_head(self._roles, self.value_head, input_ids, attention_mask)
        self._roles.use(POLICY)
        return policy_hidden, values


# ---------------------------------------------------------------------------------------------------------------
# Rollouts: ``finetune.rollout.generate_trajectory`` (shared with GRPO/RLOO)


def generate_trajectory(roles: Roles, tokenizer, prompts: list[Prompt], stop_ids, cfg: PPORunConfig, scorer, seed: int,
                        lm_head_weight) -> Rollout:
    """Phase 1, the rollout (``finetune.rollout.generate_trajectory``): this process's share of the iteration's
    ``prompts`` sampled and scored (minus ``ppo.missing_stop_penalty`` for a response that never ended its turn),
    then the rollout policy's and the reference's log-probs and the values."""
    return shared_generate_trajectory(roles, tokenizer, prompts, stop_ids, cfg.sampling, scorer, seed, lm_head_weight,
                                      cfg.ppo.mini_batch_size, cfg.ppo.missing_stop_penalty)


@dataclasses.dataclass
class Advantages:
    """Phase 2's ``[N, T]`` tensors over the response tokens of a rollout."""

    rewards: torch.Tensor
    """The KL penalty at every token plus the score at the last (whitened, mean kept, with ``ppo.whiten_rewards``)."""
    kl: torch.Tensor
    """Per-token ``log pi - log ref`` of the rollout."""
    advantages: torch.Tensor
    """GAE advantages, whitened."""
    returns: torch.Tensor


def rewards_and_advantages(rollout: Rollout, kl_coef: float, params: PPOParams, sum_across_processes=None) -> Advantages:
    """Phase 2: per-token rewards (``per_token_rewards``), ``gae`` advantages and returns, advantages whitened.

    The whitening statistics are over every process's tokens (``sum_across_processes``, :func:`process_sum`):
    per-process ones would differ between processes and change with the number of processes."""
    mask = rollout.mask.float()
    rewards, kl = per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_coef)
    if params.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, sum_across_processes=sum_across_processes)
    advantages, returns = gae(rewards, rollout.values, mask, params.gamma, params.lam)
    advantages = masked_whiten(advantages, mask, sum_across_processes=sum_across_processes)
    return Advantages(rewards, kl, advantages, returns)


UPDATE_STATS = ("policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl", "entropy", "grad_norm")


@dataclasses.dataclass
class Optimization:
    """What phase 3 changes: the prepared :class:`PolicyAndValue`, its optimizer and scheduler, the parameters they
    hold (for gradient clipping), the minibatch shuffle, and the optimizer steps taken so far."""

    accelerator: object
    module: torch.nn.Module
    optimizer: object
    scheduler: object
    params: list[torch.nn.Parameter]
    shuffle: torch.Generator
    steps: int = 0


def ppo_epochs(opt: Optimization, rollout: Rollout, adv: Advantages, lm_head_weight, params: PPOParams,
               temperature: float) -> dict[str, list[float]]:
    """Phase 3, the updates: ``params.ppo_epochs`` passes of shuffled minibatches, each one forward of the policy
    and the value adapter, ``ppo_policy_loss + value_loss_coef * ppo_value_loss``, backward, gradient clipping and
    an optimizer step. Returns each minibatch's figures by name (``UPDATE_STATS``)."""
    stats: dict[str, list[float]] = {k: [] for k in UPDATE_STATS}
    n, device, mask = len(rollout.scores), opt.accelerator.device, rollout.mask.float()
    opt.module.train()
    for _ in range(params.ppo_epochs):
        order = torch.randperm(n, generator=opt.shuffle)
        for start in range(0, n, params.mini_batch_size):
            idx = order[start : start + params.mini_batch_size]
            hidden, values = opt.module(rollout.input_ids[idx].to(device), rollout.attention_mask[idx].to(device))
            mb_mask = mask[idx].to(device)
            support = None if rollout.support is None else rollout.support[idx].to(device)
            logprobs = policy_logprobs(hidden, lm_head_weight, rollout.labels[idx].to(device), temperature, support)
            pg_loss, clip_fraction, approx_kl = ppo_policy_loss(
                logprobs, rollout.logprobs[idx].to(device), adv.advantages[idx].to(device), mb_mask, params.clip_range
            )
            vf_loss, value_clip_fraction = ppo_value_loss(
                values[:, :-1].float(), rollout.values[idx].to(device), adv.returns[idx].to(device), mb_mask,
                params.clip_range_value,
            )
            loss = pg_loss + params.value_loss_coef * vf_loss
            opt.accelerator.backward(loss)
            grad_norm = opt.accelerator.clip_grad_norm_(opt.params, params.max_grad_norm)
            opt.optimizer.step()
            opt.scheduler.step()
            opt.optimizer.zero_grad()
            opt.steps += 1
            with torch.no_grad():
                entropy = response_entropy(hidden, lm_head_weight, mb_mask, temperature, support)
            for key, value in zip(UPDATE_STATS, (pg_loss, vf_loss, clip_fraction, value_clip_fraction, approx_kl,
                                                 entropy, grad_norm)):
                stats[key].append(float(torch.as_tensor(value).detach()))
    return stats


def iteration_figures(rollout: Rollout, adv: Advantages, stats: dict[str, list[float]], accelerator):
    """Phase 4's figures of one iteration (``finetune.rollout.iteration_figures``, collectives: every process calls
    it) with this stage's reward and KL."""
    return rollout_iteration_figures(rollout, {
        "reward": adv.rewards.sum(dim=1).mean().item(),
        "kl": (adv.kl * rollout.mask.float()).sum(dim=1).mean().item(),
    }, stats, accelerator)


def log_iteration(log: MetricsLog, output_dir: Path, row: dict, records: list[dict], num_iterations: int) -> None:
    """Phase 4's output (main process): the row to ``metrics.jsonl`` and TensorBoard, the responses to
    ``rollouts.jsonl`` in (prompt, sample) order, and one printed line."""
    log.log(row)
    write_rollouts(output_dir, row["step"], records)
    print(f"iteration {row['step']}/{num_iterations}: score {row['score']:.3f} kl {row['kl']:.3f} "
          f"policy loss {row['policy_loss']:.4f} value loss {row['value_loss']:.4f} "
          f"clip {row['clip_fraction']:.3f} entropy {row['entropy']:.3f} length {row['response_length']:.1f}")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (``finetune.training_loop``), and rollouts.jsonl beside metrics.jsonl


def restore_logs(output_dir: Path, checkpoint: Path, progress: dict) -> None:
    """Roll ``rollouts.jsonl`` back to the checkpoint (main process), so the rows of the iterations run after it,
    which the resumed run repeats, are not written twice; the scaffold has already rewound ``metrics.jsonl`` to the
    checkpoint's step (``finetune.runs.rewind_metrics``: a row's step is its iteration)."""
    rewind_rollouts(output_dir, progress["rollouts_bytes"])


# ---------------------------------------------------------------------------------------------------------------
# The run


def resolve(cfg: PPORunConfig):
    """Check the SFT run and the reward run against this run's base and template (``finetune.run_dir``): from a LoRA
    SFT run the policy keeps the SFT adapter's shape; a full-weights SFT run becomes the base (``model.name``), and
    every role is a new ``adapter`` on it (the reference's stays zero: the SFT model itself)."""
    return resolve_rl_init(cfg, "ppo")


def resolve_init(cfg: PPORunConfig) -> PPORunConfig:
    """:func:`resolve`'s config, for callers that build the roles themselves."""
    return resolve(cfg)[0]


def load_data(cfg: PPORunConfig, tokenizer, template) -> StageData:
    """The prompts and (with a verifier) the eval conversations (``finetune.prompts.load_rl_data``):
    ``(prompts, skipped, eval_convs)``."""
    data = load_rl_data(cfg, tokenizer, template)
    return StageData((data.prompts, data.skipped, data.eval_conversations), data.report, data.loads)


def run(cfg: PPORunConfig) -> dict:
    """Train the policy with PPO, evaluate and save; returns the summary also written to ``summary.json``."""
    return train(cfg)[0]


def train(cfg: PPORunConfig) -> tuple[dict, Roles]:
    """:func:`run`, also returning the trained roles (the tests inspect the adapters after training)."""
    trained = run_stage(cfg, STAGE)
    return trained.summary, trained.model


def train_policy(run: StageRun) -> Trained:
    """The PPO run inside the stage scaffold: roles, optimizer, the iterations, the final evaluation."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    cfg, state, output_dir, tokenizer, template = run.cfg, run.state, run.output_dir, run.tokenizer, run.template
    prompts, skipped, eval_convs = run.data
    trackers = accelerate_trackers(cfg.ppo.report_to)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), log_with=trackers or None)  # W&B, MLflow, trackio
    main = accelerator.is_main_process
    scorer_needs_rm = bool(cfg.score.reward_model)
    resume_from = latest_complete_checkpoint(output_dir) if cfg.resume else None
    if cfg.resume and not resume_from and main:  # nothing to resume: start afresh (metrics.jsonl is rewound)
        rewind_rollouts(output_dir, 0)

    roles = load_roles(cfg, accelerator.device)
    scorer = build_scorer(cfg.score, AdapterRewardModel(roles, tokenizer, template) if scorer_needs_rm else None)
    stop_ids = stop_token_ids(template, tokenizer)
    lm_head_weight = roles.model.get_base_model().get_output_embeddings().weight
    temperature = cfg.sampling.temperature
    verifier = load_callable(cfg.eval.verifier) if eval_convs else None

    summary: dict = {"model": cfg.model.name, "resolved_model": resolve_model(cfg.model.name), "init": cfg.init,
                     "reward_model": cfg.score.reward_model, "scorer": scorer.name,
                     "num_processes": accelerator.num_processes}
    if verifier and cfg.eval.before_training and not resume_from:  # a resumed run has it from its checkpoint
        roles.use(POLICY)
        before = verifier_accuracy(roles.model, tokenizer, template, eval_convs, verifier, cfg.eval.max_new_tokens,
                                   cfg.eval.batch_size)
        summary["init_eval_accuracy"] = before.accuracy
        if main:
            print(f"verifier accuracy of the SFT init: {before.accuracy:.3f} on {before.num_prompts} eval prompts")

    # Optimizer over the trainable adapters and the value head; accelerate prepares the module holding them.
    policy_and_value = PolicyAndValue(roles)
    params = [p for p in policy_and_value.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.ppo.learning_rate, weight_decay=cfg.ppo.weight_decay)
    responses_per_process = cfg.ppo.rollout_batch_size // accelerator.num_processes * cfg.sampling.num_samples
    steps_per_iteration = cfg.ppo.ppo_epochs * math.ceil(responses_per_process / cfg.ppo.mini_batch_size)
    total_steps = cfg.ppo.num_iterations * steps_per_iteration
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=int(cfg.ppo.warmup_ratio * total_steps))
    policy_and_value, optimizer, scheduler = accelerator.prepare(policy_and_value, optimizer, scheduler)
    kl_ctl = (AdaptiveKLController(cfg.ppo.kl_coef, cfg.ppo.kl_target, cfg.ppo.kl_horizon) if cfg.ppo.adaptive_kl
              else FixedKLController(cfg.ppo.kl_coef))
    shuffle = torch.Generator().manual_seed(cfg.ppo.seed + accelerator.process_index)
    sum_across_processes = process_sum(accelerator)
    trainable = accelerator.unwrap_model(policy_and_value)

    opt = Optimization(accelerator, policy_and_value, optimizer, scheduler, params, shuffle)
    start_iteration, previous_seconds = 0, 0.0
    if resume_from:
        progress = load_checkpoint(resume_from, accelerator, trainable, shuffle)
        start_iteration, opt.steps = progress["iteration"], progress["optimizer_steps"]
        kl_ctl.value, previous_seconds = progress["kl_coef"], progress["train_seconds"]
        summary.update(progress["summary"])
        if main:
            restore_logs(output_dir, resume_from, progress)
            print(f"resuming from {resume_from} (iteration {start_iteration} of {cfg.ppo.num_iterations})")
        state.wait_for_everyone()
    log = MetricsLog(output_dir, main, cfg.ppo.report_to, accelerator, to_dict(cfg))
    started = time.perf_counter()
    for iteration in range(start_iteration, cfg.ppo.num_iterations):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in prompt_schedule(len(prompts), iteration, cfg.ppo.rollout_batch_size, cfg.ppo.seed)]
        seed = cfg.sampling.seed + iteration * accelerator.num_processes + accelerator.process_index
        rollout = generate_trajectory(roles, tokenizer, batch, stop_ids, cfg, scorer, seed, lm_head_weight)
        adv = rewards_and_advantages(rollout, kl_ctl.value, cfg.ppo, sum_across_processes)
        stats = ppo_epochs(opt, rollout, adv, lm_head_weight, cfg.ppo, temperature)

        figures, records, response_tokens = iteration_figures(rollout, adv, stats, accelerator)
        kl_ctl.update(figures["kl"], n_steps=len(records))
        row = {"step": iteration + 1, "optimizer_steps": opt.steps, "learning_rate": scheduler.get_last_lr()[0],
               "loss": figures["policy_loss"] + cfg.ppo.value_loss_coef * figures["value_loss"], **figures,
               "kl_coef": kl_ctl.value, "tokens_per_second": response_tokens / (time.perf_counter() - t0)}
        if main:
            log_iteration(log, output_dir, row, records, cfg.ppo.num_iterations)
        stop_on_non_finite(figures, iteration + 1, output_dir, main, "ppo.learning_rate")

        done = iteration + 1
        if cfg.ppo.save_every and (done % cfg.ppo.save_every == 0 or done == cfg.ppo.num_iterations):
            progress = {"iteration": done, "optimizer_steps": opt.steps, "kl_coef": kl_ctl.value,
                        "train_seconds": previous_seconds + time.perf_counter() - started,
                        "summary": {k: summary[k] for k in ("init_eval_accuracy",) if k in summary},
                        "rollouts_bytes": rollouts_size(output_dir) if main else 0}
            save_checkpoint(output_dir, done, accelerator, trainable, shuffle, progress, cfg.ppo.save_total_limit)
    train_seconds = previous_seconds + time.perf_counter() - started
    optimizer_steps = opt.steps
    log.close()

    last = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1]) if main else {}
    summary.update(iterations=cfg.ppo.num_iterations, optimizer_steps=optimizer_steps, train_seconds=train_seconds,
                   skipped_prompts=len(skipped),
                   **{f"final_{k}": last[k] for k in ("score", "kl", "policy_loss", "value_loss", "entropy",
                                                       "response_length", "kl_coef") if k in last})
    if verifier:
        roles.use(POLICY)
        after = verifier_accuracy(roles.model, tokenizer, template, eval_convs, verifier, cfg.eval.max_new_tokens,
                                  cfg.eval.batch_size)
        summary["eval_accuracy"] = after.accuracy
        summary["eval_samples"] = after.samples

    return Trained(summary, lambda directory: save_roles(roles, directory, main), roles.model.get_base_model().config,
                   roles)


def save_roles(roles: Roles, directory: Path, main: bool) -> None:
    """The policy adapter at the top of ``directory`` (a run's adapter like any other), the value adapter and its head
    under ``value/`` (main process)."""
    from safetensors.torch import save_file

    if main:
        save_adapter(roles.model, POLICY, directory)
        save_adapter(roles.model, VALUE, directory / "value")
        save_file({"weight": roles.value_head.weight.detach().cpu().contiguous()}, directory / "value" / "value_head.safetensors")


def check(cfg: PPORunConfig) -> None:
    """Every tracker of ``ppo.report_to`` is installed (before the output directory is touched)."""
    from ..trainer_config import check_trackers_installed

    check_trackers_installed("ppo.report_to", cfg.ppo.report_to)


STAGE = Stage("ppo", load_data, train_policy, resolve=resolve, seed=lambda cfg: cfg.ppo.seed, check=check)


def results_table(summary: dict) -> str:
    """SFT model against the PPO policy, as the recipe prints it at the end."""
    rows = [("verifier accuracy", summary.get("init_eval_accuracy"), summary.get("eval_accuracy"))]
    if "final_kl" in summary:
        rows.append(("KL to reference", 0.0, summary["final_kl"]))
    return two_column_table(("SFT", "PPO"), rows)
