"""PPO from an SFT run with a critic, on accelerate: policy, reference, value and reward as adapters on one base.

The base (bf16/fp32, or 4-bit NF4 for QLoRA) is loaded once. Every role is a named PEFT adapter on it, and switching
roles is ``activate_adapter`` (PEFT's ``set_adapter``, keeping the trainable set fixed):

- ``policy``: the SFT adapter, trainable;
- ``reference``: the same SFT adapter, frozen (the KL anchor is the SFT model, never the raw base);
- ``value``: an adapter plus a scalar head (``torch.nn.Linear(hidden, 1)`` on the last hidden state), trainable; it
  starts from the reward model's adapter and head when one is given, else from the SFT adapter and a zero head;
- ``reward``: the reward run's adapter and head, frozen, when ``score.reward_model`` is set; a verifier (any
  ``module:function``) can be used instead or added to it (``finetune.scorers``).

One iteration (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155; the conventions of "The N Implementation
Details of RLHF with PPO", Huang et al. 2024):

1. Rollout: each process samples responses for its share of the iteration's prompts (``finetune.generation``) and
   scores them; then, without gradients, the rollout policy's, the reference's and the value head's per-token
   log-probs and values are computed.
2. Rewards and advantages: per-token KL penalty against the reference plus the score at the last token
   (``per_token_rewards``), ``gae`` advantages and returns, advantages whitened (``masked_whiten``) with the mean
   and variance of every process's response tokens together, so N processes whiten as one process would.
3. Updates: ``ppo_epochs`` passes of shuffled minibatches; each is one forward of the policy and one of the value
   adapter (:class:`PolicyAndValue`, the module accelerate prepares), ``ppo_policy_loss`` +
   ``value_loss_coef * ppo_value_loss``, backward, gradient clipping, an AdamW step.
4. The KL controller is updated with the rollout's KL; the iteration's figures go to ``metrics.jsonl``.
5. Every ``ppo.save_every`` iterations a ``checkpoint-N/`` is written (:func:`save_checkpoint`): the trainable
   weights, optimizer and scheduler, KL coefficient, every process's RNG states and the metrics so far, staged and
   renamed into place once complete. ``--resume`` continues from the newest complete one exactly as the run would
   have gone on (on CPU: the same figures at every later iteration).

Entropies and log-probs are computed from the last hidden states a chunk of positions at a time
(``chunked_token_logprobs``, ``chunked_entropy``): the ``[N, T, V]`` float32 logits never exist.

Dropout is switched off (every dropout's p set to 0, so activation checkpointing, which acts in train mode, still
can), and at the first minibatch the policy's log-probs equal the rollout's: the ratio is exactly 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch

from ..config import ConfigError, PPOConfig
from ..data import load_conversations, write_rejects
from ..evaluate import load_callable, verifier_accuracy
from ..generation import SamplingConfig, generate
from ..kernels import auto_chunk_size
from ..logprobs import chunked_entropy, chunked_token_logprobs, masked_whiten, top_k_support
from ..losses import AdaptiveKLController, FixedKLController, gae, per_token_rewards, ppo_policy_loss, ppo_value_loss
from ..models import (
    activate_adapter,
    adapter_config_from_run,
    adapter_run_base,
    backbone_hidden_states,
    check_init_run,
    init_run_kind,
    load_adapter,
    load_base_model,
    load_scalar_head_adapter,
    load_tokenizer,
    lora_config,
    resolve_model,
    run_config,
    save_adapter,
)
from ..runs import (
    COMPLETE_MARKER,
    atomic_write_text,
    checkpoints,
    discard_incomplete_checkpoints,
    latest_complete_checkpoint,
    plot_loss,
    prepare_output_dir,
    process_state,
    two_column_table,
    write_config,
    write_summary,
)
from ..scorers import Sample, build_scorer
from ..templates import get_template, render, save_with_template, stop_token_ids
from .rejection_sampling import Prompt, load_prompts

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"
TRAINABLE = (POLICY, VALUE)
"""The adapters the optimizer holds; ``reference`` and ``reward`` never train."""


# ---------------------------------------------------------------------------------------------------------------
# The roles on one base


@dataclasses.dataclass
class Roles:
    """The shared base with its adapters, and the scalar heads of the value and reward roles."""

    model: object
    """``peft.PeftModel`` holding the ``policy``, ``reference``, ``value`` and (optionally) ``reward`` adapters."""
    value_head: torch.nn.Linear
    reward_head: torch.nn.Linear | None

    def use(self, role: str) -> None:
        """Switch the base to ``role``'s adapter (the trainable set stays ``policy`` and ``value``)."""
        activate_adapter(self.model, role, TRAINABLE)


def load_roles(cfg: PPOConfig, device=None) -> Roles:
    """Load the base once and put the four roles on it (see the module docstring), on ``device`` when given (the
    accelerator's: the reward head is not part of the module accelerate prepares, so everything is placed here)."""
    from peft import get_peft_model

    base = load_base_model(cfg.model, cfg.adapter.method)
    if init_run_kind(cfg.init) == "full":  # the full-weights SFT run is the base (resolve_init made it model.name)
        model = get_peft_model(base, lora_config(cfg.adapter), adapter_name=POLICY)
        model.add_adapter(REFERENCE, lora_config(cfg.adapter))  # lora_B = 0: exactly the SFT model
        model.set_requires_grad([REFERENCE], False)
        sft_adapter = None
    else:
        model = load_adapter(base, cfg.init, POLICY, trainable=True)
        load_adapter(model, cfg.init, REFERENCE, trainable=False)
        sft_adapter = cfg.init
    reward_head = None
    if cfg.score.reward_model:
        reward_head = load_scalar_head_adapter(model, cfg.score.reward_model, REWARD, trainable=False)
        value_head = load_scalar_head_adapter(model, cfg.score.reward_model, VALUE, trainable=True)
    else:
        if sft_adapter:
            load_adapter(model, sft_adapter, VALUE, trainable=True)
        else:
            model.add_adapter(VALUE, lora_config(cfg.adapter))
            model.set_requires_grad([VALUE], True)
        value_head = torch.nn.Linear(base.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(value_head.weight)
    for module in model.modules():  # no dropout anywhere: rollout and update log-probs must agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    roles = Roles(model, value_head.to(device), reward_head.to(device) if reward_head is not None else None)
    roles.use(POLICY)
    return roles


def scalar_head(roles: Roles, head: torch.nn.Linear, input_ids, attention_mask) -> torch.Tensor:
    """``[B, T]`` head outputs at every position with the active adapter."""
    hidden = backbone_hidden_states(roles.model, input_ids, attention_mask)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


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


class AdapterRewardModel:
    """The ``reward`` role as a reward model for ``finetune.scorers.RewardModelScorer``: conversations rendered with
    the template (as the reward run trained), scored at their last token by the reward adapter and head."""

    def __init__(self, roles: Roles, tokenizer, template):
        self.roles, self.tokenizer, self.template = roles, tokenizer, template

    @torch.no_grad()
    def score(self, conversations, batch_size: int = 16) -> list[float]:
        from ..generation import left_pad

        device = next(self.roles.model.parameters()).device
        scores: list[float] = []
        self.roles.use(REWARD)
        try:
            for start in range(0, len(conversations), batch_size):
                ids = [render(self.template, list(c), self.tokenizer)[0] for c in conversations[start : start + batch_size]]
                input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id)  # left: the last token is at T-1
                values = scalar_head(self.roles, self.roles.reward_head, input_ids.to(device), mask.to(device))
                scores.extend(values[:, -1].float().cpu().tolist())
        finally:
            self.roles.use(POLICY)
        return scores


# ---------------------------------------------------------------------------------------------------------------
# Rollouts


@dataclasses.dataclass
class Rollout:
    """One process's responses of one iteration, as ``[N, T]`` tensors over ``prompt + response`` minus the first
    token: position ``t`` scores the token at ``t + 1``. ``mask`` is 1 on response tokens."""

    input_ids: torch.Tensor  # [N, T + 1], right-padded
    attention_mask: torch.Tensor  # [N, T + 1]
    labels: torch.Tensor  # [N, T], the next token; -100 off the response
    mask: torch.Tensor  # [N, T]
    scores: torch.Tensor  # [N]
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    support: torch.Tensor | None = None  # [N, T, k] with top-k sampling: the tokens each position drew from
    records: list[dict] = dataclasses.field(default_factory=list)


def build_rollout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> Rollout:
    """Concatenate each prompt with its response, right-pad, and mark the response tokens."""
    rows = [p + r for p, r in zip(prompt_ids, response_ids)]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, : len(p) + len(r)] = 1
        response[i, len(p) : len(p) + len(r)] = True
    labels = input_ids[:, 1:].masked_fill(~response[:, 1:], -100)
    return Rollout(input_ids, attention_mask, labels, response[:, 1:], torch.zeros(len(rows)))


def policy_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor, temperature: float,
                    support: torch.Tensor | None = None):
    """``[N, T]`` log-probs of the sampled tokens at the sampling temperature, from the last hidden states (never
    materialising the ``[N, T, V]`` logits: ``chunked_token_logprobs``, chunks of 64 MiB of float32 logits). With
    ``support`` (top-k sampling) each position's distribution is the softmax over its ``k`` rollout tokens."""
    return chunked_token_logprobs(hidden[:, :-1] / temperature, lm_head_weight, labels,
                                  auto_chunk_size(lm_head_weight.shape[0]), support=support)


def response_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, mask: torch.Tensor, temperature: float,
                     support: torch.Tensor | None = None):
    """Mean entropy of the tempered policy (over ``support`` where given) over the response tokens (``mask``
    ``[N, T]``), 0 when there are none; from the response positions' last hidden states, a chunk at a time."""
    response = mask.bool()
    response_hidden = hidden[:, :-1][response]  # [tokens, H]
    if not len(response_hidden):
        return torch.zeros((), device=hidden.device)
    return chunked_entropy(response_hidden / temperature, lm_head_weight, auto_chunk_size(lm_head_weight.shape[0]),
                           support=None if support is None else support[response]).mean()


def process_sum(accelerator):
    """``tensor -> its sum over every process`` (an all-reduce), for ``masked_whiten``'s statistics; None with one
    process. Tensors go to the accelerator's device for the collective (NCCL needs CUDA tensors) and come back."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t.to(accelerator.device), "sum").to(t.device)


@torch.no_grad()
def score_rollout(roles: Roles, rollout: Rollout, lm_head_weight, temperature: float, batch_size: int,
                  top_k: int = 0) -> None:
    """Fill in the rollout policy's and the reference's log-probs and the value head's values (no gradients).

    With top-k sampling (``top_k > 0``) the policy is what was sampled from: at each position the softmax over the
    policy's ``top_k`` largest logits (``rollout.support``). The policy's log-probs, now and in the updates, are
    taken over that support, and so are the reference's: the KL penalty compares the two on the tokens the rollout
    could have drawn, and is 0 where they agree."""
    device = next(roles.model.parameters()).device
    was_training = roles.model.training
    roles.model.eval()
    logprobs, ref_logprobs, values, supports = [], [], [], []
    for start in range(0, len(rollout.scores), batch_size):
        ids = rollout.input_ids[start : start + batch_size].to(device)
        mask = rollout.attention_mask[start : start + batch_size].to(device)
        labels = rollout.labels[start : start + batch_size].to(device)
        roles.use(POLICY)
        hidden = backbone_hidden_states(roles.model, ids, mask)
        support = top_k_support(hidden[:, :-1], lm_head_weight, top_k, labels) if top_k else None
        logprobs.append(policy_logprobs(hidden, lm_head_weight, labels, temperature, support))
        roles.use(REFERENCE)
        ref_logprobs.append(policy_logprobs(backbone_hidden_states(roles.model, ids, mask), lm_head_weight, labels,
                                            temperature, support))
        roles.use(VALUE)
        values.append(scalar_head(roles, roles.value_head, ids, mask)[:, :-1].float())
        supports.append(support)
    roles.use(POLICY)
    roles.model.train(was_training)
    rollout.logprobs = torch.cat(logprobs).cpu()
    rollout.ref_logprobs = torch.cat(ref_logprobs).cpu()
    rollout.values = torch.cat(values).cpu()
    rollout.support = torch.cat(supports).cpu() if top_k else None


def sample_rollout(roles: Roles, tokenizer, prompts: list[Prompt], stop_ids, cfg: PPOConfig, scorer, seed: int) -> Rollout:
    """Sample ``sampling.num_samples`` responses per prompt with the policy, score them, and lay them out."""
    k = cfg.sampling.num_samples
    roles.use(POLICY)
    sampling = SamplingConfig(cfg.sampling.max_new_tokens, cfg.sampling.temperature, top_k=cfg.sampling.top_k,
                              seed=seed)
    completions = generate(roles.model, tokenizer, [p.ids for p in prompts for _ in range(k)], stop_ids, sampling,
                           cfg.sampling.batch_size)
    samples = [Sample(p.messages, completions[i * k + j].text, index=p.index * k + j)
               for i, p in enumerate(prompts) for j in range(k)]
    by_part = scorer.scores_by_part(samples)
    scores = scorer.total(by_part, len(samples))
    if cfg.ppo.missing_stop_penalty is not None:
        scores = [s - cfg.ppo.missing_stop_penalty * (not c.stopped) for s, c in zip(scores, completions)]
    responses = [c.token_ids + ([c.stop_id] if c.stopped else []) for c in completions]
    rollout = build_rollout([p.ids for p in prompts for _ in range(k)], responses, tokenizer.pad_token_id)
    rollout.scores = torch.tensor(scores, dtype=torch.float32)
    rollout.records = [
        {"prompt_index": s.index // k, "sample": s.index % k, "prompt": s.question, "response": s.response,
         "score": score, "stopped": c.stopped, **{f"score/{name}": part[n] for name, part in by_part.items()}}
        for n, (s, score, c) in enumerate(zip(samples, scores, completions))
    ]
    return rollout


def prompt_schedule(num_prompts: int, iteration: int, batch: int, seed: int) -> list[int]:
    """The prompt indices of one iteration: consecutive slices of a seeded shuffle, reshuffled each pass over the
    data (the same on every process, which then takes its share)."""
    order: list[int] = []
    start = iteration * batch
    epoch = start // num_prompts
    while len(order) < (start % num_prompts) + batch:
        generator = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(num_prompts, generator=generator).tolist()
        epoch += 1
    offset = start % num_prompts
    return order[offset : offset + batch]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints

TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE = "trainable.safetensors", "optimizer.pt", "ppo_state.json"


def rng_states(shuffle: torch.Generator) -> dict:
    """This process's random states: Python, NumPy, torch (CPU and CUDA) and the minibatch shuffle generator."""
    import numpy as np

    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "shuffle": shuffle.get_state()}


def set_rng_states(states: dict, shuffle: torch.Generator) -> None:
    """Restore what :func:`rng_states` recorded."""
    import numpy as np

    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
    shuffle.set_state(states["shuffle"])


def save_checkpoint(output_dir: Path, iteration: int, trainable: torch.nn.Module, optimizer, scheduler, shuffle,
                    progress: dict, accelerator, keep: int | None) -> Path:
    """Write ``checkpoint-ITERATION/`` (called by every process, after the iteration's metrics row).

    It is built in ``.checkpoint-ITERATION.staging/`` (a name ``--resume`` never matches), marked complete, then
    renamed into place, so a process killed at any point leaves either no ``checkpoint-ITERATION`` or a whole one.
    Holds: every trainable tensor of ``trainable`` (the policy and value adapters and the value head) by name, the
    optimizer and scheduler state, ``progress`` (iteration, optimizer steps, KL coefficient, what ``summary.json``
    has gathered so far, the length of ``rollouts.jsonl``) as JSON, a copy of ``metrics.jsonl``, and each process's
    RNG states. Afterwards only the newest ``keep`` checkpoints are kept (all when None)."""
    from safetensors.torch import save_file

    main = accelerator.is_main_process
    final, staging = output_dir / f"checkpoint-{iteration}", output_dir / f".checkpoint-{iteration}.staging"
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_states(shuffle), staging / f"rng_state_{accelerator.process_index}.pt")
    if main:  # the weights and optimizer state are the same on every process (DDP keeps them in step)
        save_file({n: p.detach().cpu().contiguous() for n, p in trainable.named_parameters() if p.requires_grad},
                  staging / TRAINABLE_FILE)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, staging / OPTIMIZER_FILE)
        shutil.copyfile(output_dir / "metrics.jsonl", staging / "metrics.jsonl")
        (staging / STATE_FILE).write_text(json.dumps({**progress, "num_processes": accelerator.num_processes}))
    accelerator.wait_for_everyone()  # every process's RNG file is written before the checkpoint counts
    if main:
        atomic_write_text(staging / COMPLETE_MARKER, json.dumps({"step": iteration}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        complete = [path for _, path in checkpoints(output_dir) if (path / COMPLETE_MARKER).is_file()]
        for old in complete[: -keep] if keep else ():
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, trainable: torch.nn.Module, optimizer, scheduler, shuffle, accelerator) -> dict:
    """Load what :func:`save_checkpoint` wrote into the freshly built run (every process); returns its progress."""
    from safetensors.torch import load_file

    progress = json.loads((path / STATE_FILE).read_text())
    if progress["num_processes"] != accelerator.num_processes:
        raise ConfigError(f"--resume: {path} was written by {progress['num_processes']} processes, this run has "
                          f"{accelerator.num_processes}; resume with the same number (the minibatch order is per process)")
    saved = load_file(path / TRAINABLE_FILE)
    params = {n: p for n, p in trainable.named_parameters() if p.requires_grad}
    if saved.keys() != params.keys():
        raise ConfigError(f"--resume: the trainable tensors of {path} are not this run's (adapter or model changed?): "
                          f"{sorted(saved.keys() ^ params.keys())[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name])
    state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(torch.load(path / f"rng_state_{accelerator.process_index}.pt", weights_only=True), shuffle)
    return progress


def restore_logs(output_dir: Path, checkpoint: Path, progress: dict) -> None:
    """Roll ``metrics.jsonl`` and ``rollouts.jsonl`` back to the checkpoint (main process), so the rows of the
    iterations run after it, which the resumed run repeats, are not written twice."""
    atomic_write_text(output_dir / "metrics.jsonl", (checkpoint / "metrics.jsonl").read_text())
    rollouts = output_dir / "rollouts.jsonl"
    if rollouts.exists():
        with open(rollouts, "r+b") as f:
            f.truncate(progress["rollouts_bytes"])


# ---------------------------------------------------------------------------------------------------------------
# The run


def resolve_init(cfg: PPOConfig) -> PPOConfig:
    """Check the SFT run and the reward run against this run's base and template. From a LoRA SFT run the policy
    keeps the SFT adapter's shape; a full-weights SFT run becomes the base (``model.name``), and every role is a new
    ``adapter`` on it (the reference's stays zero: the SFT model itself)."""
    if check_init_run(cfg.init, cfg.model.name, cfg.data.template) == "adapter":
        adapter, _ = adapter_config_from_run(cfg.adapter, cfg.init)
        cfg = dataclasses.replace(cfg, adapter=adapter)
    else:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=cfg.init))
    if cfg.score.reward_model:
        option = "--score.reward_model"
        if init_run_kind(cfg.score.reward_model, option) != "adapter":
            raise ConfigError(f"{option} {cfg.score.reward_model}: not a reward run (no adapter with a scalar head)")
        reward_base = adapter_run_base(run_config(cfg.score.reward_model))
        if reward_base and resolve_model(reward_base) != resolve_model(cfg.model.name):
            raise ConfigError(f"{option} {cfg.score.reward_model} was trained on {reward_base}, not on this run's base "
                              f"{cfg.model.name}; its adapter cannot share this base")
        check_init_run(cfg.score.reward_model, cfg.model.name, cfg.data.template, option)
    return cfg


def run(cfg: PPOConfig) -> dict:
    """Train the policy with PPO, evaluate and save; returns the summary also written to ``summary.json``."""
    return train(cfg)[0]


def train(cfg: PPOConfig) -> tuple[dict, Roles]:
    """:func:`run`, also returning the trained roles (the tests inspect the adapters after training)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from torch.utils.tensorboard import SummaryWriter
    from transformers import get_scheduler, set_seed

    cfg = resolve_init(cfg)  # a bad --init fails before anything is written
    state = process_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    if cfg.ppo.rollout_batch_size % accelerator.num_processes:
        raise ConfigError(f"ppo.rollout_batch_size ({cfg.ppo.rollout_batch_size}) must be a multiple of the number of "
                          f"processes ({accelerator.num_processes})")
    scorer_needs_rm = bool(cfg.score.reward_model)

    tokenizer = load_tokenizer(cfg.model.name)
    template = get_template(cfg.data.template, tokenizer)
    reports: list = []  # what each load skipped, for OUTPUT_DIR/rejects.jsonl
    conversations = load_conversations(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_train_samples,
                                       skip_invalid=cfg.data.skip_invalid, reports=reports, name="train data")
    prompts, skipped = load_prompts(conversations, template, tokenizer, cfg.data.max_prompt_length)
    if not prompts:
        raise ConfigError(f"no prompt of {cfg.data.train} fits data.max_prompt_length={cfg.data.max_prompt_length}")
    eval_convs = []
    if cfg.data.eval and cfg.eval.verifier:
        eval_convs = load_conversations(cfg.data.eval, cfg.data.format, cfg.data.eval_split, cfg.data.max_eval_samples,
                                        skip_invalid=cfg.data.skip_invalid, reports=reports, name="eval data")
        eval_convs = eval_convs[: cfg.eval.num_samples] if cfg.eval.num_samples else eval_convs

    output_dir = prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite, main)
    if main:
        write_rejects(output_dir, reports)
    state.wait_for_everyone()
    if cfg.resume and main:
        for path in discard_incomplete_checkpoints(output_dir):
            print(f"discarded incomplete checkpoint {path}")
    state.wait_for_everyone()
    resume_from = latest_complete_checkpoint(output_dir) if cfg.resume else None
    if main:
        write_config(output_dir, cfg)
        print(f"prompts: {len(prompts)} from {cfg.data.train}, {len(skipped)} skipped (longer than "
              f"data.max_prompt_length)")
    set_seed(cfg.ppo.seed)

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

    optimizer_steps, start_iteration, previous_seconds = 0, 0, 0.0
    if resume_from:
        progress = load_checkpoint(resume_from, trainable, optimizer, scheduler, shuffle, accelerator)
        start_iteration, optimizer_steps = progress["iteration"], progress["optimizer_steps"]
        kl_ctl.value, previous_seconds = progress["kl_coef"], progress["train_seconds"]
        summary.update(progress["summary"])
        if main:
            restore_logs(output_dir, resume_from, progress)
            print(f"resuming from {resume_from} (iteration {start_iteration} of {cfg.ppo.num_iterations})")
        state.wait_for_everyone()
    writer = SummaryWriter(str(output_dir / "runs" / time.strftime("%b%d_%H-%M-%S"))) if main else None
    started = time.perf_counter()
    for iteration in range(start_iteration, cfg.ppo.num_iterations):
        t0 = time.perf_counter()
        batch = [prompts[i] for i in prompt_schedule(len(prompts), iteration, cfg.ppo.rollout_batch_size, cfg.ppo.seed)]
        with state.split_between_processes(batch) as share:
            seed = cfg.sampling.seed + iteration * accelerator.num_processes + accelerator.process_index
            rollout = sample_rollout(roles, tokenizer, share, stop_ids, cfg, scorer, seed)
        score_rollout(roles, rollout, lm_head_weight, temperature, cfg.ppo.mini_batch_size, cfg.sampling.top_k)

        # Rewards, advantages, returns: pure functions over [N, T] response tokens.
        mask = rollout.mask.float()
        rewards, kl = per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask, kl_ctl.value)
        # Whitening statistics over every process's tokens: per-process ones would differ between processes and
        # change with the number of processes.
        if cfg.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, sum_across_processes=sum_across_processes)
        advantages, returns = gae(rewards, rollout.values, mask, cfg.ppo.gamma, cfg.ppo.lam)
        advantages = masked_whiten(advantages, mask, sum_across_processes=sum_across_processes)

        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                          "value_clip_fraction", "approx_kl", "entropy", "grad_norm")}
        n = len(rollout.scores)
        device = accelerator.device
        policy_and_value.train()
        for _ in range(cfg.ppo.ppo_epochs):
            order = torch.randperm(n, generator=shuffle)
            for start in range(0, n, cfg.ppo.mini_batch_size):
                idx = order[start : start + cfg.ppo.mini_batch_size]
                hidden, values = policy_and_value(rollout.input_ids[idx].to(device), rollout.attention_mask[idx].to(device))
                mb_mask = mask[idx].to(device)
                support = None if rollout.support is None else rollout.support[idx].to(device)
                logprobs = policy_logprobs(hidden, lm_head_weight, rollout.labels[idx].to(device), temperature, support)
                pg_loss, clip_fraction, approx_kl = ppo_policy_loss(
                    logprobs, rollout.logprobs[idx].to(device), advantages[idx].to(device), mb_mask, cfg.ppo.clip_range
                )
                vf_loss, value_clip_fraction = ppo_value_loss(
                    values[:, :-1].float(), rollout.values[idx].to(device), returns[idx].to(device), mb_mask,
                    cfg.ppo.clip_range_value,
                )
                loss = pg_loss + cfg.ppo.value_loss_coef * vf_loss
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, cfg.ppo.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                optimizer_steps += 1
                with torch.no_grad():
                    entropy = response_entropy(hidden, lm_head_weight, mb_mask, temperature, support)
                for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_fraction),
                                   ("value_clip_fraction", value_clip_fraction), ("approx_kl", approx_kl),
                                   ("entropy", entropy), ("grad_norm", grad_norm)):
                    stats[key].append(float(torch.as_tensor(value).detach()))

        # The iteration's figures, averaged over processes.
        kl_per_response = (kl * mask).sum(dim=1)
        local = {
            "score": rollout.scores.mean().item(),
            "reward": rewards.sum(dim=1).mean().item(),
            "kl": kl_per_response.mean().item(),
            "response_length": mask.sum(dim=1).mean().item(),
            "stopped_fraction": sum(r["stopped"] for r in rollout.records) / max(len(rollout.records), 1),
            **{k: sum(v) / len(v) for k, v in stats.items()},
        }
        for name in (k for k in rollout.records[0] if k.startswith("score/")) if rollout.records else ():
            local[name] = sum(r[name] for r in rollout.records) / len(rollout.records)
        figures = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in local.items()}
        records = gather_object(rollout.records) if accelerator.num_processes > 1 else rollout.records
        response_tokens = accelerator.reduce(mask.sum().to(device), "sum").item()
        kl_ctl.update(figures["kl"], n_steps=len(records))
        row = {
            "step": iteration + 1,
            "optimizer_steps": optimizer_steps,
            "learning_rate": scheduler.get_last_lr()[0],
            "loss": figures["policy_loss"] + cfg.ppo.value_loss_coef * figures["value_loss"],
            **figures,
            "kl_coef": kl_ctl.value,
            "tokens_per_second": response_tokens / (time.perf_counter() - t0),
        }
        if main:
            with open(output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            with open(output_dir / "rollouts.jsonl", "a") as f:
                for record in sorted(records, key=lambda r: (r["prompt_index"], r["sample"])):
                    f.write(json.dumps({"iteration": iteration + 1, **record}) + "\n")
            for key, value in row.items():
                writer.add_scalar(f"ppo/{key}", value, iteration + 1)
            print(f"iteration {iteration + 1}/{cfg.ppo.num_iterations}: score {row['score']:.3f} kl {row['kl']:.3f} "
                  f"policy loss {row['policy_loss']:.4f} value loss {row['value_loss']:.4f} "
                  f"clip {row['clip_fraction']:.3f} entropy {row['entropy']:.3f} length {row['response_length']:.1f}")
        if not all(math.isfinite(v) for v in figures.values()):
            from ..runs import NonFiniteLossError

            raise NonFiniteLossError(f"iteration {iteration + 1}: non-finite figures {figures}; lower ppo.learning_rate")
        done = iteration + 1
        if cfg.ppo.save_every and (done % cfg.ppo.save_every == 0 or done == cfg.ppo.num_iterations):
            rollouts_file = output_dir / "rollouts.jsonl"
            progress = {"iteration": done, "optimizer_steps": optimizer_steps, "kl_coef": kl_ctl.value,
                        "train_seconds": previous_seconds + time.perf_counter() - started,
                        "summary": {k: summary[k] for k in ("init_eval_accuracy",) if k in summary},
                        "rollouts_bytes": rollouts_file.stat().st_size if main else 0}
            save_checkpoint(output_dir, done, trainable, optimizer, scheduler, shuffle, progress, accelerator,
                            cfg.ppo.save_total_limit)
    train_seconds = previous_seconds + time.perf_counter() - started
    if writer:
        writer.close()

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

    if main:
        save_adapter(roles.model, POLICY, output_dir)
        save_adapter(roles.model, VALUE, output_dir / "value")
        from safetensors.torch import save_file

        save_file({"weight": roles.value_head.weight.detach().cpu().contiguous()}, output_dir / "value" / "value_head.safetensors")
        save_with_template(tokenizer, template, output_dir, model_config=roles.model.get_base_model().config)
        write_summary(output_dir, summary)
        plot_loss(output_dir)
    state.wait_for_everyone()
    return summary, roles


def results_table(summary: dict) -> str:
    """SFT model against the PPO policy, as the recipe prints it at the end."""
    rows = [("verifier accuracy", summary.get("init_eval_accuracy"), summary.get("eval_accuracy"))]
    if "final_kl" in summary:
        rows.append(("KL to reference", 0.0, summary["final_kl"]))
    return two_column_table(("SFT", "PPO"), rows)
