"""Prompts to sample from, for every stage that samples its own training data (rejection sampling, PPO; GRPO and
RLOO next): each conversation up to its last user turn, rendered for generation, and the order an online loop
takes them in.
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
