"""Evaluation that needs generation: verifier accuracy of greedy answers on held-out prompts."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .data import prompt_and_reference
from .generation import Decoding, generate


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


@torch.no_grad()
def eval_loss(model, rows: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """Mean negative log-likelihood per trained token over ``rows`` (``input_ids`` and ``labels``), every token
    weighted the same whatever its batch. Rows are right-padded, not packed; under several processes each takes a
    share and the sums are gathered.

    Computed outside the trainer on purpose: an ``evaluate()`` before ``train()`` makes transformers skip wrapping
    the model in DDP, and the processes then train apart (measured: 2 CPU processes diverged from 1 at step 3).
    """
    from accelerate.utils import gather_object
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from .logprobs import has_plain_lm_head, policy_token_logprobs, shift_for_causal_lm, token_logprobs
    from .runs import process_state

    state = process_state()
    collate = DataCollatorForLanguageModeling(pad_token_id=pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunked = has_plain_lm_head(model)
    total, count = 0.0, 0
    with state.split_between_processes(rows) as share:
        for start in range(0, len(share), batch_size):
            batch = collate(share[start : start + batch_size])
            input_ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
            if chunked:  # from hidden states: a Llama 3 vocabulary's [B, T, V] float32 logits never exist at once
                logprobs = policy_token_logprobs(model, input_ids, mask, labels)
            else:  # an adapter on lm_head: score through the head module itself
                logprobs = token_logprobs(*shift_for_causal_lm(model(input_ids=input_ids, attention_mask=mask).logits, labels))
            total -= logprobs.sum().item()
            count += int((labels[:, 1:] != -100).sum())
    model.train(was_training)
    if state.num_processes > 1:
        parts = gather_object([(total, count)])
        total, count = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return total / max(count, 1)


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
    """Greedy-answer the last user turn of each conversation and score the answers with ``verifier``.

    Under several processes each answers its own share of the prompts; the results are gathered, so every process
    returns the same figure over all prompts, each counted once.
    """
    from accelerate.utils import gather_object

    from .runs import process_state
    from .templates import render_prompt, stop_token_ids

    state = process_state()
    with state.split_between_processes(list(range(len(conversations)))) as indices:
        prompts, questions = [], []
        for i in indices:
            messages, question, _ = prompt_and_reference(conversations[i])
            prompts.append(render_prompt(template, messages, tokenizer))
            questions.append(question)
        completions = generate(
            model,
            tokenizer,
            prompts,
            stop_token_ids(template, tokenizer),
            Decoding(max_new_tokens=max_new_tokens),
            batch_size=batch_size,
            progress="verifier accuracy",
        ) if prompts else []
        local = [
            {"index": i, "prompt": q, "response": c.text, "correct": bool(verifier(q, c.text))}
            for i, q, c in zip(indices, questions, completions)
        ]
    results = sorted(gather_object(local) if state.num_processes > 1 else local, key=lambda r: r["index"])
    correct = [r["correct"] for r in results]
    samples = [{k: r[k] for k in ("prompt", "response", "correct")} for r in results[:num_shown]]
    return VerifierResult(sum(correct) / max(len(correct), 1), len(correct), samples)
