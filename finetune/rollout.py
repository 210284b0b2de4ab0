"""Rollouts: a group of G sampled responses per prompt, scored, and laid out as token tensors for a policy-gradient
update. Rejection sampling ranks each prompt's group; PPO trains on the rollout with a critic; the group-relative
methods (GRPO, RLOO) compare each response with the rest of its group. Every caller sees the same layout: sample
``j`` of the ``i``-th prompt is at ``i * G + j``.

The RL stages' rollout phase is :func:`generate_trajectory`: each process samples and scores its share of the
iteration's prompts (whole groups: a prompt's G samples stay on one process), then the rollout policy's, the
reference's and (with a critic) the value head's per-token figures are computed without gradients
(:func:`score_rollout`), from the last hidden states a chunk of positions at a time (the ``[N, T, V]`` float32
logits never exist). Each iteration's responses go to ``rollouts.jsonl`` (:func:`write_rollouts`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .generation import Completion, Decoding, generate
from .logprobs import auto_chunk_size, chunked_entropy, chunked_token_logprobs, top_k_support
from .models import backbone_hidden_states
from .prompts import Prompt
from .roles import POLICY, REFERENCE, VALUE, Roles, scalar_head
from .runs import process_state
from .scorers import Sample, WeightedSum


@dataclasses.dataclass
class ScoredSample:
    """One sampled response to a prompt, with its total score and each scorer's part of it."""

    prompt: Prompt
    sample: int
    """Its number within the prompt's group (0 to G - 1)."""
    completion: Completion
    score: float
    scores: dict[str, float]
    """Each scorer's score by name (``finetune.scorers.WeightedSum.scores_by_part``)."""

    @property
    def question(self) -> str:
        """The last user turn: what a verifier checks the response against."""
        return self.prompt.messages[-1]["content"]


def sample_groups(model, tokenizer, prompts: list[Prompt], group_size: int, stop_ids, sampling: Decoding,
                  batch_size: int, scorer: WeightedSum, progress: str | None = None) -> list[ScoredSample]:
    """``group_size`` scored samples of each prompt, ordered by (prompt, sample).

    One call to ``finetune.generation.generate`` over every prompt repeated ``group_size`` times (so one seeded
    random stream draws them all, in that order), then one call of the scorer over every sample. The scorer names
    a failing sample by its number ``prompt.index * group_size + sample``. With no prompts nothing is generated
    (the sampling seed is not set). ``progress`` describes the generation's progress bar (none without it)."""
    completions = (generate(model, tokenizer, [p.ids for p in prompts for _ in range(group_size)], stop_ids, sampling,
                            batch_size, progress=progress) if prompts else [])
    samples = [Sample(p.messages, completions[i * group_size + j].text, index=p.index * group_size + j)
               for i, p in enumerate(prompts) for j in range(group_size)]
    by_part = scorer.scores_by_part(samples)
    totals = scorer.total(by_part, len(samples))
    return [ScoredSample(prompts[n // group_size], n % group_size, completion, total,
                         {name: part[n] for name, part in by_part.items()})
            for n, (completion, total) in enumerate(zip(completions, totals))]


@dataclasses.dataclass
class Rollout:
    """One process's responses of one iteration, as ``[N, T]`` tensors over ``prompt + response`` minus the first
    token: position ``t`` scores the token at ``t + 1``. ``mask`` is 1 on response tokens. The log-probs, values
    and support are filled in by the trainer (no values for a method without a critic)."""

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


def rollout_of(samples: list[ScoredSample], scores: list[float], pad_id: int) -> Rollout:
    """The rollout of scored samples, rewarded with ``scores`` (their scores, or a trainer's adjustment of them).
    Each response is the sampled tokens plus the stop token it ended on, so the policy learns to end its turn."""
    responses = [s.completion.token_ids + ([s.completion.stop_id] if s.completion.stopped else []) for s in samples]
    rollout = build_rollout([s.prompt.ids for s in samples], responses, pad_id)
    rollout.scores = torch.tensor(scores, dtype=torch.float32)
    return rollout


# ---------------------------------------------------------------------------------------------------------------
# The rollout phase of PPO and GRPO/RLOO


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


@torch.no_grad()
def score_rollout(roles: Roles, rollout: Rollout, lm_head_weight, temperature: float, batch_size: int,
                  top_k: int = 0) -> None:
    """Fill in the rollout policy's and the reference's log-probs and, with a value role, the value head's values
    (no gradients).

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
        if roles.value_head is not None:
            roles.use(VALUE)
            values.append(scalar_head(roles, roles.value_head, ids, mask)[:, :-1].float())
        supports.append(support)
    roles.use(POLICY)
    roles.model.train(was_training)
    rollout.logprobs = torch.cat(logprobs).cpu()
    rollout.ref_logprobs = torch.cat(ref_logprobs).cpu()
    rollout.values = torch.cat(values).cpu() if values else None
    rollout.support = torch.cat(supports).cpu() if top_k else None


def sample_rollout(roles: Roles, tokenizer, prompts: list[Prompt], stop_ids, sampling, scorer, seed: int,
                   missing_stop_penalty: float | None = None) -> Rollout:
    """Sample ``sampling.num_samples`` responses per prompt with the policy (``sampling``: a
    ``finetune.config.SamplingParams``), score them (minus ``missing_stop_penalty`` for a response that never ended
    its turn), and lay them out, with one record per response for ``rollouts.jsonl``."""
    roles.use(POLICY)
    decoding = Decoding(sampling.max_new_tokens, sampling.temperature, top_k=sampling.top_k, seed=seed)
    samples = sample_groups(roles.model, tokenizer, prompts, sampling.num_samples, stop_ids, decoding,
                            sampling.batch_size, scorer, progress="rollout")
    scores = [s.score for s in samples]
    if missing_stop_penalty is not None:
        scores = [score - missing_stop_penalty * (not s.completion.stopped) for score, s in zip(scores, samples)]
    rollout = rollout_of(samples, scores, tokenizer.pad_token_id)
    rollout.records = [
        {"prompt_index": s.prompt.index, "sample": s.sample, "prompt": s.question, "response": s.completion.text,
         "score": score, "stopped": s.completion.stopped, **{f"score/{name}": part for name, part in s.scores.items()}}
        for s, score in zip(samples, scores)
    ]
    return rollout


def generate_trajectory(roles: Roles, tokenizer, prompts: list[Prompt], stop_ids, sampling, scorer, seed: int,
                        lm_head_weight, batch_size: int, missing_stop_penalty: float | None = None) -> Rollout:
    """The rollout phase: this process's share of the iteration's ``prompts`` sampled and scored
    (:func:`sample_rollout`), then the rollout policy's and the reference's log-probs and any values
    (:func:`score_rollout`, ``batch_size`` sequences at a time)."""
    with process_state().split_between_processes(prompts) as share:
        rollout = sample_rollout(roles, tokenizer, share, stop_ids, sampling, scorer, seed, missing_stop_penalty)
    score_rollout(roles, rollout, lm_head_weight, sampling.temperature, batch_size, sampling.top_k)
    return rollout


ROLLOUTS_FILE = "rollouts.jsonl"


def write_rollouts(output_dir: Path, iteration: int, records: list[dict]) -> None:
    """Append one iteration's responses (every process's, gathered) to ``rollouts.jsonl`` in (prompt, sample) order
    (main process)."""
    with open(Path(output_dir) / ROLLOUTS_FILE, "a") as f:
        for record in sorted(records, key=lambda r: (r["prompt_index"], r["sample"])):
            f.write(json.dumps({"iteration": iteration, **record}) + "\n")


def rollouts_size(output_dir: Path) -> int:
    """The size of ``rollouts.jsonl`` in bytes (0 when absent), kept in a checkpoint's progress."""
    path = Path(output_dir) / ROLLOUTS_FILE
    return path.stat().st_size if path.exists() else 0


def rewind_rollouts(output_dir: Path, size: int) -> None:
    """Roll ``rollouts.jsonl`` back to ``size`` bytes, its size at the checkpoint being resumed (main process), so
    the rows of the iterations run after it, which the resumed run repeats, are not written twice."""
    path = Path(output_dir) / ROLLOUTS_FILE
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(size)


def resolve_rl_init(cfg, section: str):
    """The ``--init`` resolution of an RL stage (PPO, GRPO/RLOO): the SFT run and the reward run checked against
    this run's base and template (``finetune.run_dir``), and ``<section>.rollout_batch_size`` split evenly over the
    processes (each process rolls out its share of the prompts). Returns ``(cfg, init run, adapter fields taken)``."""
    from .config import ConfigError
    from .run_dir import open_reward_run
    from .run_dir import resolve_init as resolve_adapter_init

    cfg, init, changed = resolve_adapter_init(cfg)
    if cfg.score.reward_model:
        open_reward_run(cfg.score.reward_model, cfg.model.name, cfg.data.template)
    processes = process_state().num_processes
    rollout_batch_size = getattr(cfg, section).rollout_batch_size
    if rollout_batch_size % processes:
        raise ConfigError(f"{section}.rollout_batch_size ({rollout_batch_size}) must be a multiple of the number of "
                          f"processes ({processes})")
    return cfg, init, changed


def iteration_figures(rollout: Rollout, stage_figures: dict, stats: dict[str, list[float]], accelerator):
    """One iteration's figures averaged over processes (collectives: every process calls it): the rollout's score,
    then the stage's own ``stage_figures`` (reward, KL, ...), response length, stopped fraction, the update
    ``stats`` and each scorer part; with the gathered rollout records and every process's response-token count."""
    from accelerate.utils import gather_object

    mask, device = rollout.mask.float(), accelerator.device
    local = {
        "score": rollout.scores.mean().item(),
        **stage_figures,
        "response_length": mask.sum(dim=1).mean().item(),
        "stopped_fraction": sum(r["stopped"] for r in rollout.records) / max(len(rollout.records), 1),
        **{k: sum(v) / len(v) for k, v in stats.items()},
    }
    for name in (k for k in rollout.records[0] if k.startswith("score/")) if rollout.records else ():
        local[name] = sum(r[name] for r in rollout.records) / len(rollout.records)
    figures = {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in local.items()}
    records = gather_object(rollout.records) if accelerator.num_processes > 1 else rollout.records
    response_tokens = accelerator.reduce(mask.sum().to(device), "sum").item()
    return figures, records, response_tokens
