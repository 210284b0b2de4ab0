"""Rollouts: a group of G sampled responses per prompt, scored, and laid out as token tensors for a policy-gradient
update. Rejection sampling ranks each prompt's group; PPO trains on the rollout with a critic; a group-relative
method (GRPO, RLOO) would compare each response with the rest of its group. Every caller sees the same layout:
sample ``j`` of the ``i``-th prompt is at ``i * G + j``.
"""

from __future__ import annotations

import dataclasses

import torch

from .generation import Completion, Decoding, generate
from .prompts import Prompt
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
