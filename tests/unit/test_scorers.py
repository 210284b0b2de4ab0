"""Scorers (finetune.scorers): the suite verifier, any module:function, a reward model, a weighted sum, and a failing
sample named in the error. Milliseconds, except the reward-model test (a stand-in reward run, seconds)."""

import math

import pytest

from finetune.config import ConfigError, ScoreConfig
from finetune.scorers import RewardModelScorer, Sample, ScoringError, VerifierScorer, WeightedSum, build_scorer


def sample(question, response, index=0):
    return Sample([{"role": "user", "content": question}], response, index)


SAMPLES = [sample("What is 2 + 3?", "5", 0), sample("What is 2 + 3?", "6", 1), sample("Reverse the words: a b", "b a", 2)]


def answer_length(prompt: str, response: str) -> float:
    """A module:function scorer for the tests: the response's length in characters."""
    return float(len(response))


def fails_on_six(prompt: str, response: str) -> bool:
    if response == "6":
        raise ZeroDivisionError("cannot score six")
    return True


def returns_text(prompt: str, response: str):
    return "yes"


def returns_nan(prompt: str, response: str):
    return math.nan


def test_suite_verifier_scores_correct_answers_one():
    scorer = VerifierScorer.from_spec("finetune.suite:verify")
    assert scorer(SAMPLES) == [1.0, 0.0, 1.0]
    assert scorer.name == "finetune.suite:verify"


def test_any_module_function_is_a_scorer():
    assert VerifierScorer.from_spec("test_scorers:answer_length")(SAMPLES) == [1.0, 1.0, 3.0]


def test_weighted_sum_adds_weighted_parts_and_reports_each():
    verifier = VerifierScorer.from_spec("finetune.suite:verify")
    length = VerifierScorer.from_spec("test_scorers:answer_length")
    total = WeightedSum([(verifier, 2.0), (length, -0.5)])
    # 2 * [1, 0, 1] - 0.5 * [1, 1, 3] = [1.5, -0.5, 0.5]
    assert total(SAMPLES) == [1.5, -0.5, 0.5]
    assert total.scores_by_part(SAMPLES) == {"finetune.suite:verify": [1.0, 0.0, 1.0],
                                             "test_scorers:answer_length": [1.0, 1.0, 3.0]}
    assert total.name == "2 * finetune.suite:verify + -0.5 * test_scorers:answer_length"


def test_failing_sample_is_named_with_its_prompt_and_the_reason():
    with pytest.raises(ScoringError) as info:
        VerifierScorer.from_spec("test_scorers:fails_on_six")(SAMPLES)
    message = str(info.value)
    assert "test_scorers:fails_on_six" in message and "sample 1" in message
    assert "'What is 2 + 3?'" in message and "ZeroDivisionError: cannot score six" in message
    assert info.value.sample is SAMPLES[1]


@pytest.mark.parametrize("fn, why", [("returns_text", "returned 'yes' (str); expected a bool or a number"),
                                     ("returns_nan", "returned nan, not a finite number")])
def test_a_score_that_is_not_a_finite_number_is_an_error(fn, why):
    with pytest.raises(ScoringError, match="sample 0 .*" + why.replace("(", r"\(").replace(")", r"\)")):
        VerifierScorer.from_spec(f"test_scorers:{fn}")(SAMPLES[:1])


class FakeRewardModel:
    """Scores a conversation by the length of its last reply; fails on a reply that says 'boom'."""

    def __init__(self):
        self.calls = []

    def score(self, conversations, batch_size=16):
        self.calls.append(len(conversations))
        if any(c[-1]["content"] == "boom" for c in conversations):
            raise RuntimeError("sequence too long for the context")
        return [float(len(c[-1]["content"])) for c in conversations]


def test_reward_model_scorer_scores_the_conversation_and_names_a_failing_sample():
    rm = FakeRewardModel()
    assert RewardModelScorer(rm, "rm")(SAMPLES) == [1.0, 1.0, 3.0]
    bad = [*SAMPLES, sample("Write in capital letters: ok", "boom", 7)]
    with pytest.raises(ScoringError, match=r"scorer rm failed on sample 7 \(prompt 'Write in capital letters: ok'\): "
                                           r"RuntimeError: sequence too long"):
        RewardModelScorer(rm, "rm")(bad)


def test_build_scorer_from_config():
    scorer = build_scorer(ScoreConfig(verifier="finetune.suite:verify", verifier_weight=0.5))
    assert scorer(SAMPLES) == [0.5, 0.0, 0.5]
    both = build_scorer(ScoreConfig(verifier="finetune.suite:verify", reward_model="runs/reward", reward_model_weight=2.0),
                        reward_model=FakeRewardModel())
    assert both(SAMPLES) == [1.0 + 2.0, 0.0 + 2.0, 1.0 + 6.0]
    with pytest.raises(ConfigError, match="score.verifier: cannot import module 'no_such_module'"):
        build_scorer(ScoreConfig(verifier="no_such_module:f"))
    with pytest.raises(ConfigError, match="score needs a verifier, a reward_model or both"):
        ScoreConfig(verifier=None).resolve("bundled:suite_messages_rl.jsonl")
    with pytest.raises(ConfigError, match="score needs a verifier"):  # auto finds no verifier for other prompts
        ScoreConfig().resolve("my_prompts.jsonl")
