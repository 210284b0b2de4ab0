"""Scoring responses: the reward model's ``score`` API.

A reward run (``recipes/reward.py``) saves a LoRA adapter with the scalar ``score`` head, the tokenizer with its chat
template and ``config.yaml``. :func:`load_reward_model` puts them back on the base model, and
:meth:`RewardModel.score` turns texts or conversations into one float each, rendering conversations with the run's
template exactly as training did::

    from finetune.reward_model import load_reward_model

    rm = load_reward_model("runs/reward")
    rm.score([[{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .losses import bradley_terry_loss


def _right_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


@torch.no_grad()
def sequence_scores(model, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """The scalar head's output for each token sequence (read at its last token), in order.

    Args:
        model: a sequence classifier with ``num_labels=1`` (a reward model), PEFT-wrapped or not; its
            ``config.pad_token_id`` must be ``pad_id`` (the head reads the last non-pad position).
        sequences: token ids, each a whole rendered conversation.
        pad_id: the id right-padding is done with.
        batch_size: sequences per forward.
    """
    if any(len(s) == 0 for s in sequences):
        raise ValueError("cannot score an empty sequence")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        for start in range(0, len(sequences), batch_size):
            ids, mask = _right_pad(sequences[start : start + batch_size], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            scores.extend(logits[:, 0].float().cpu().tolist())
    finally:
        model.train(was_training)
    return scores


def pairwise_metrics(model, rows: Sequence[dict], pad_id: int, batch_size: int = 16) -> dict[str, float]:
    """Exact held-out figures of a reward model over pairs ``{"chosen_ids", "rejected_ids"}``.

    Returns ``accuracy`` (fraction of pairs scored chosen > rejected, ties wrong), ``margin`` (mean chosen - rejected
    score) and ``loss`` (mean Bradley-Terry loss, ``finetune.losses.bradley_terry_loss``), over every pair, not
    averaged per batch.
    """
    chosen = torch.tensor(sequence_scores(model, [r["chosen_ids"] for r in rows], pad_id, batch_size))
    rejected = torch.tensor(sequence_scores(model, [r["rejected_ids"] for r in rows], pad_id, batch_size))
    losses, accuracy = bradley_terry_loss(chosen, rejected)
    return {"accuracy": accuracy.item(), "margin": (chosen - rejected).mean().item(), "loss": losses.mean().item()}


class RewardModel:
    """A loaded reward model: backbone + adapter + scalar head, its tokenizer and chat template."""

    def __init__(self, model, tokenizer, template):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template

    def encode(self, item) -> list[int]:
        """Token ids of one item: a conversation (a list of ``{"role", "content"}`` ending on the assistant turn to
        score, or a ``data_formats.Conversation``) is rendered with the run's template, as in training; a string is
        taken as already-formatted text and tokenised as it is (no special tokens added).

        The assistant turn scored may be empty: a model can answer nothing, and that answer gets a score too (the
        template rendered with an empty content, read at its last token, the end-of-turn)."""
        from .templates import render

        if isinstance(item, str):
            return self.tokenizer.encode(item, add_special_tokens=False)
        messages = getattr(item, "messages", item)
        return render(self.template, list(messages), self.tokenizer, empty_reply=True)[0]

    def score(self, items: Sequence, batch_size: int = 16) -> list[float]:
        """One float per text or conversation: higher is preferred (an empty reply included). Nothing is truncated
        (the score is read at the last token), so each item must fit the model's context."""
        return sequence_scores(self.model, [self.encode(item) for item in items], self.tokenizer.pad_token_id, batch_size)

    __call__ = score


def load_reward_model(run_dir: str | Path) -> RewardModel:
    """Load a finished reward run (``recipes/reward.py``'s output directory) for scoring.

    The run's base (``finetune.run_dir.RunDir.base_model``) is loaded as a sequence classifier (in 4-bit for a QLoRA
    run), the saved adapter and ``score`` head go on top, and the tokenizer and template come from the run.

    Raises:
        ConfigError: ``run_dir`` is not a finished run with an adapter and its ``config.yaml``.
    """
    import dataclasses

    from peft import PeftModel

    from .config import ConfigError, ModelConfig, from_dict
    from .models import load_sequence_classifier, load_tokenizer
    from .run_dir import open_run
    from .templates import get_template

    run = open_run(run_dir, "reward model")
    if run.kind != "adapter" or not run.config:
        raise ConfigError(f"reward model {run_dir}: not a finished reward run (needs an adapter and config.yaml)")
    model_cfg = dataclasses.replace(from_dict(ModelConfig, run.config.get("model") or {}, "model"), name=run.base_model)
    base = load_sequence_classifier(model_cfg, run.method or "lora", for_training=False)
    tokenizer = load_tokenizer(str(run.path))
    base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, str(run.path))
    model.eval()
    return RewardModel(model, tokenizer, get_template(run.template, tokenizer))
