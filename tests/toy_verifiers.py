"""Verifiers the recipe tests name in configs (``--score.verifier=toy_verifiers:shortness``): tests/ is on the
child processes' path (recipe_processes.child_env, factories), so they import by module name as a user's would."""


def shortness(prompt: str, response: str) -> float:
    """A graded score for the tests (the stand-in SFT model never answers a suite prompt correctly): 0 for an empty
    response, else 1 falling by 0.05 per character, at least 0."""
    return max(0.0, 1.0 - 0.05 * len(response)) if response.strip() else 0.0


def short_answer(prompt: str, response: str) -> float:
    """A dense reward for the RL tests (the stand-in SFT model never answers a suite prompt correctly): 1 for a
    response of at most 12 characters, falling linearly to 0 at 36."""
    return max(0.0, min(1.0, (36 - len(response)) / 24))


def negative_length(prompt: str, response: str) -> float:
    """A score that tells an untrained model's samples apart (the suite's verifier fails them all): minus the length."""
    return -float(len(response))
