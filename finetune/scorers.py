"""Scorers for sampled responses: a verifier, a reward model, and a weighted sum of several.

A scorer is a callable taking a list of :class:`Sample` and returning one float per sample, higher is better.
Rejection sampling ranks a prompt's K samples with it; PPO uses it as the reward. Three kinds:

- :class:`VerifierScorer`: a Python function ``(prompt, response) -> bool | number``, named in a config as
  ``module:function`` (``finetune.suite:verify`` checks answers to the bundled suite); ``True`` scores 1.
- :class:`RewardModelScorer`: a reward model's scalar score of the whole conversation, from anything with
  ``finetune.reward_model.RewardModel``'s ``score(conversations)`` (a reward run loaded with
  ``finetune.reward_model.load_reward_model``, or PPO's reward adapter on the shared base).
- :class:`WeightedSum`: ``sum_i w_i * scorer_i``, also giving each part's scores for logging.

A scorer that fails on a sample, or returns something that is not a finite number, raises :class:`ScoringError`
naming the scorer, the sample's index, its prompt and the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Sample:
    """One sampled response to a prompt."""

    prompt: list[dict[str, str]]
    """The conversation answered: optional system, alternating turns, ending on the user turn."""
    response: str
    """The sampled reply (end-of-turn token excluded)."""
    index: int = 0
    """The sample's number in its run (named in errors)."""
    meta: dict = field(default_factory=dict, compare=False)

    @property
    def question(self) -> str:
        """The last user turn: what a verifier checks the response against."""
        return self.prompt[-1]["content"]

    def conversation(self) -> list[dict[str, str]]:
        """The prompt with the response as the assistant's turn (what a reward model scores)."""
        return [*self.prompt, {"role": "assistant", "content": self.response}]


class ScoringError(ValueError):
    """A scorer failed on one sample; the message names the scorer, the sample and why."""

    def __init__(self, scorer: str, sample: Sample, reason: str):
        self.scorer, self.sample, self.reason = scorer, sample, reason
        question = sample.question if len(sample.question) <= 120 else sample.question[:117] + "..."
        super().__init__(f"scorer {scorer} failed on sample {sample.index} (prompt {question!r}): {reason}")


def _as_score(value, scorer: str, sample: Sample) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ScoringError(scorer, sample, f"returned {value}, not a finite number")
        return float(value)
    raise ScoringError(scorer, sample, f"returned {value!r} ({type(value).__name__}); expected a bool or a number")


class VerifierScorer:
    """Scores each sample with ``fn(prompt, response)`` (the last user turn and the reply)."""

    def __init__(self, fn: Callable[[str, str], bool | float], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__qualname__", repr(fn))

    @classmethod
    def from_spec(cls, spec: str) -> VerifierScorer:
        """``package.module:function`` -> a scorer calling that function."""
        from .evaluate import load_callable

        return cls(load_callable(spec), spec)

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        scores = []
        for sample in samples:
            try:
                value = self.fn(sample.question, sample.response)
            except Exception as e:  # a user's verifier can raise anything; say which sample made it
                raise ScoringError(self.name, sample, f"{type(e).__name__}: {e}") from e
            scores.append(_as_score(value, self.name, sample))
        return scores


class RewardModelScorer:
    """Scores each sample's conversation (prompt + response) with a reward model's scalar head.

    ``reward_model`` is anything with ``score(conversations, batch_size) -> list[float]``, such as
    ``finetune.reward_model.load_reward_model(run_dir)``; it renders each conversation with the template it trained with.
    """

    def __init__(self, reward_model, name: str = "reward_model", batch_size: int = 16):
        self.reward_model = reward_model
        self.name = name
        self.batch_size = batch_size

    @classmethod
    def from_run(cls, run_dir: str, batch_size: int = 16) -> RewardModelScorer:
        """A finished reward run (``recipes/reward.py``'s output directory) as a scorer."""
        from .reward_model import load_reward_model

        return cls(load_reward_model(run_dir), f"reward_model:{run_dir}", batch_size)

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        if not samples:
            return []
        conversations = [s.conversation() for s in samples]
        try:
            raw = self.reward_model.score(conversations, batch_size=self.batch_size)
        except Exception:
            # Find the sample that breaks it (scored alone), so the error can name it; re-raise if none does.
            for sample, conversation in zip(samples, conversations):
                try:
                    self.reward_model.score([conversation], batch_size=1)
                except Exception as e:
                    raise ScoringError(self.name, sample, f"{type(e).__name__}: {e}") from e
            raise
        return [_as_score(value, self.name, sample) for value, sample in zip(raw, samples)]


class WeightedSum:
    """``sum_i weight_i * scorer_i(sample)``; ``parts`` gives each scorer's own scores for logging."""

    def __init__(self, parts: Sequence[tuple[Callable, float]]):
        if not parts:
            raise ValueError("a weighted sum needs at least one scorer")
        self.parts = list(parts)
        self.name = " + ".join(f"{w:g} * {getattr(s, 'name', s)}" for s, w in self.parts)

    def scores_by_part(self, samples: Sequence[Sample]) -> dict[str, list[float]]:
        """Each scorer's unweighted scores, by its name."""
        return {getattr(scorer, "name", str(i)): scorer(samples) for i, (scorer, _) in enumerate(self.parts)}

    def total(self, by_part: dict[str, list[float]], num_samples: int) -> list[float]:
        """The weighted sum of the scores ``scores_by_part`` returned."""
        totals = [0.0] * num_samples
        for (_, weight), scores in zip(self.parts, by_part.values()):
            totals = [t + weight * s for t, s in zip(totals, scores)]
        return totals

    def __call__(self, samples: Sequence[Sample]) -> list[float]:
        return self.total(self.scores_by_part(samples), len(samples))


def build_scorer(score_cfg, reward_model=None) -> WeightedSum:
    """The scorer a :class:`finetune.config.ScoreConfig` names: its verifier and/or reward model, weighted.

    ``reward_model`` overrides loading ``score_cfg.reward_model`` with ``load_reward_model`` (PPO passes its reward
    adapter on the shared base).
    """
    from .config import ConfigError

    parts: list[tuple[Callable, float]] = []
    if score_cfg.verifier:
        try:
            verifier = VerifierScorer.from_spec(score_cfg.verifier)
        except ValueError as e:
            raise ConfigError(f"score.verifier: {e}") from None
        parts.append((verifier, score_cfg.verifier_weight))
    if score_cfg.reward_model:
        scorer = (
            RewardModelScorer(reward_model, f"reward_model:{score_cfg.reward_model}")
            if reward_model is not None
            else RewardModelScorer.from_run(score_cfg.reward_model)
        )
        parts.append((scorer, score_cfg.reward_model_weight))
    return WeightedSum(parts)
