"""Batched sampling with a KV cache, left padding, and the template's stop tokens.

transformers' ``generate`` does the decoding; this module does what every caller would otherwise repeat: render
prompts through the chat template, left-pad them, stop at the template's end-of-turn tokens, and cut each
completion at its first stop token.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used, so `finetune chat --help` does not wait for it
    import torch


@dataclass
class Decoding:
    max_new_tokens: int = 64
    """Longest completion in tokens."""
    temperature: float = 0.0
    """0 for greedy decoding; otherwise the softmax temperature."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 keeps all)."""
    seed: int | None = None
    """Seed for sampling; the same seed gives the same samples on CPU."""


@dataclass
class Completion:
    """One generated reply: its token ids (stop token excluded), text, and whether it ended on a stop token."""

    token_ids: list[int]
    text: str
    stopped: bool
    stop_id: int | None = None
    """The stop token the reply ended on (``None`` if it ran to ``max_new_tokens``): a trainer that scores the
    sampled tokens, PPO's, appends it to ``token_ids`` so the policy learns to end its turn."""


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)`` of shape [B, T], so every prompt ends at T-1."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    stop_ids: list[int],
    sampling: Decoding,
    batch_size: int = 32,
    progress: str | None = None,
) -> list[Completion]:
    """Complete each prompt (already rendered to ids); returns completions in prompt order.

    With ``progress`` (a description such as ``"verifier accuracy"``) a tqdm bar counts the sequences generated, on
    the local main process only (``LOCAL_RANK`` 0 or unset), so several processes show one bar per machine. No
    gradients are kept: transformers' ``generate`` runs under ``torch.no_grad``."""
    import torch
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompt_ids), desc=progress, unit="seq", leave=False, dynamic_ncols=True,
               disable=progress is None or os.environ.get("LOCAL_RANK", "0") != "0")
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    was_training = model.training
    model.eval()
    completions: list[Completion] = []
    try:
        for start in range(0, len(prompt_ids), batch_size):
            batch = prompt_ids[start : start + batch_size]
            input_ids, attention_mask = left_pad(batch, pad_id)
            kwargs = dict(
                max_new_tokens=sampling.max_new_tokens,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
                use_cache=True,
            )
            if sampling.temperature > 0:
                kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k)
            else:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            output = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            )
            for row in output[:, input_ids.shape[1] :].tolist():
                completions.append(cut_at_stop(row, stop_ids, pad_id, tokenizer))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return completions


def cut_at_stop(token_ids: list[int], stop_ids: list[int], pad_id: int, tokenizer) -> Completion:
    """Keep the tokens before the first stop token (later tokens are padding after the row finished)."""
    stops = set(stop_ids)
    kept: list[int] = []
    stop_id = None
    for tok in token_ids:
        if tok in stops:
            stop_id = tok
            break
        kept.append(tok)
    stopped = stop_id is not None
    if not stopped:  # rows that ran to max_new_tokens carry no padding, but strip any to be safe
        while kept and kept[-1] == pad_id and pad_id not in stops:
            kept.pop()
    return Completion(kept, tokenizer.decode(kept, skip_special_tokens=True), stopped, stop_id)
