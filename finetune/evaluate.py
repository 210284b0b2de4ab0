"""Evaluation that needs generation: verifier accuracy of greedy answers on held-out prompts."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from .data import prompt_and_reference
from .generation import SamplingConfig, generate


def load_callable(spec: str) -> Callable:
    """``package.module:function`` -> the function (how configs name verifiers and scorers)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r} named in {spec!r}: {e}") from None
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})") from None
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


@dataclass
class VerifierResult:
    accuracy: float
    """Fraction of prompts answered correctly."""
    num_prompts: int
    samples: list[dict]
    """A few (prompt, response, correct) examples to show."""


def verifier_accuracy(
    model,
    tokenizer,
    template,
    conversations,
    verifier: Callable[[str, str], bool],
    max_new_tokens: int = 32,
    batch_size: int = 32,
    num_shown: int = 5,
) -> VerifierResult:
    """Greedy-answer the last user turn of each conversation and score the answers with ``verifier``."""
    from .templates import render_prompt, stop_token_ids

    prompts, questions = [], []
    for conv in conversations:
        messages, question, _ = prompt_and_reference(conv)
        prompts.append(render_prompt(template, messages, tokenizer))
        questions.append(question)
    completions = generate(
        model,
        tokenizer,
        prompts,
        stop_token_ids(template, tokenizer),
        SamplingConfig(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
    )
    correct = [bool(verifier(q, c.text)) for q, c in zip(questions, completions)]
    samples = [
        {"prompt": q, "response": c.text, "correct": ok}
        for q, c, ok in list(zip(questions, completions, correct))[:num_shown]
    ]
    return VerifierResult(sum(correct) / max(len(correct), 1), len(correct), samples)
