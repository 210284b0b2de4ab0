"""Prompts to sample from, for every stage that samples its own training data (rejection sampling, PPO, GRPO and
RLOO): each conversation up to its last user turn, rendered for generation, and the order an online loop takes them
in; :func:`load_rl_data` is the online loops' (PPO, GRPO/RLOO) whole data load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .templates import render_prompt


@dataclass
class Prompt:
    """A prompt to sample for: its number in the data, the conversation up to the user turn, and its token ids."""

    index: int
    messages: list[dict[str, str]]
    ids: list[int]


def load_prompts(conversations, template, tokenizer, max_prompt_length: int) -> tuple[list[Prompt], list[str]]:
    """Each conversation up to its last user turn, rendered for generation; prompts longer than
    ``max_prompt_length`` tokens are skipped and their origins returned (the caller reports them)."""
    prompts, skipped = [], []
    for conv in conversations:
        messages = list(conv.messages)
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
        if not messages:
            skipped.append(conv.origin)
            continue
        ids = render_prompt(template, messages, tokenizer)
        if len(ids) > max_prompt_length:
            skipped.append(conv.origin)
            continue
        prompts.append(Prompt(len(prompts), messages, ids))
    return prompts, skipped


def prompt_schedule(num_prompts: int, iteration: int, batch: int, seed: int) -> list[int]:
    """The prompt indices of one iteration of an online loop: consecutive slices of a seeded shuffle, reshuffled
    each pass over the data (the same on every process, which then takes its share)."""
    order: list[int] = []
    start = iteration * batch
    epoch = start // num_prompts
    while len(order) < (start % num_prompts) + batch:
        generator = torch.Generator().manual_seed(seed + epoch)
        order += torch.randperm(num_prompts, generator=generator).tolist()
        epoch += 1
    offset = start % num_prompts
    return order[offset : offset + batch]


@dataclass
class RLData:
    """What an online loop (PPO, GRPO/RLOO) trains and evaluates on."""

    prompts: list[Prompt]
    skipped: list[str]
    """The prompts left out for being longer than ``data.max_prompt_length``."""
    eval_conversations: list
    """Held-out conversations for verifier accuracy (empty without ``data.eval`` and ``eval.verifier``)."""
    report: list[str]
    loads: list
    """Each load's ``data_formats.LoadReport`` (for ``OUTPUT_DIR/rejects.jsonl``)."""


def load_rl_data(cfg, tokenizer, template) -> RLData:
    """The prompts of ``cfg.data.train`` and (with a verifier) the eval conversations of ``cfg.data.eval``; ``cfg`` is
    a PPO or GRPO run config (a ``PromptDataConfig`` and an ``EvalConfig``). No prompt that fits is an error."""
    from .config import ConfigError
    from .data import load_conversations

    loads: list = []
    conversations = load_conversations(cfg.data.train, cfg.data.format, cfg.data.split, cfg.data.max_train_samples,
                                       skip_invalid=cfg.data.skip_invalid, reports=loads, name="train data")
    prompts, skipped = load_prompts(conversations, template, tokenizer, cfg.data.max_prompt_length)
    if not prompts:
        raise ConfigError(f"no prompt of {cfg.data.train} fits data.max_prompt_length={cfg.data.max_prompt_length}")
    eval_convs = []
    if cfg.data.eval and cfg.eval.verifier:
        eval_convs = load_conversations(cfg.data.eval, cfg.data.format, cfg.data.eval_split, cfg.data.max_eval_samples,
                                        skip_invalid=cfg.data.skip_invalid, reports=loads, name="eval data")
        eval_convs = eval_convs[: cfg.eval.num_samples] if cfg.eval.num_samples else eval_convs
    report = [f"prompts: {len(prompts)} from {cfg.data.train}, {len(skipped)} skipped (longer than "
              f"data.max_prompt_length)"]
    return RLData(prompts, skipped, eval_convs, report, loads)
