"""The roles of an RL run as named PEFT adapters on one base, loaded once (PPO and GRPO/RLOO share them):

- ``policy``: the SFT adapter, trainable;
- ``reference``: the same SFT adapter, frozen (the KL anchor is the SFT model, never the raw base with adapters off);
- ``value`` (PPO only): an adapter plus a scalar head (``torch.nn.Linear(hidden, 1)`` on the last hidden state),
  trainable; it starts from the reward model's adapter and head when one is given, else from the SFT adapter and a
  zero head;
- ``reward``: the reward run's adapter and head, frozen, when ``score.reward_model`` is set.

Switching roles is ``activate_adapter`` (PEFT's ``set_adapter``, keeping the trainable set fixed).
"""

from __future__ import annotations

import dataclasses

import torch

from .models import (
    activate_adapter,
    backbone_hidden_states,
    load_adapter,
    load_base_model,
    load_scalar_head_adapter,
    lora_config,
)
from .run_dir import run_kind
from .templates import render

POLICY, REFERENCE, VALUE, REWARD = "policy", "reference", "value", "reward"


@dataclasses.dataclass
class Roles:
    """The shared base with its adapters, and the scalar heads of the value and reward roles."""

    model: object
    """``peft.PeftModel`` holding the ``policy``, ``reference`` and (optionally) ``value`` and ``reward`` adapters."""
    value_head: torch.nn.Linear | None
    """The value role's head; None without a critic (GRPO, RLOO)."""
    reward_head: torch.nn.Linear | None
    trainable: tuple[str, ...] = (POLICY, VALUE)
    """The adapters the optimizer holds; ``reference`` and ``reward`` never train."""

    def use(self, role: str) -> None:
        """Switch the base to ``role``'s adapter (the trainable set stays :attr:`trainable`)."""
        activate_adapter(self.model, role, self.trainable)


def load_roles(cfg, device=None, value: bool = True) -> Roles:
    """Load the base once and put the roles on it (see the module docstring), the ``value`` role only with ``value``;
    on ``device`` when given (the accelerator's: the heads are not part of the module accelerate prepares, so
    everything is placed here). ``cfg`` is a PPO or GRPO run config (``init``, ``model``, ``adapter``, ``score``)."""
    from peft import get_peft_model

    base = load_base_model(cfg.model, cfg.adapter.method)
    if run_kind(cfg.init) == "full":  # the full-weights SFT run is the base (resolve made it model.name)
        model = get_peft_model(base, lora_config(cfg.adapter), adapter_name=POLICY)
        model.add_adapter(REFERENCE, lora_config(cfg.adapter))  # lora_B = 0: exactly the SFT model
        model.set_requires_grad([REFERENCE], False)
        sft_adapter = None
    else:
        model = load_adapter(base, cfg.init, POLICY, trainable=True)
        load_adapter(model, cfg.init, REFERENCE, trainable=False)
        sft_adapter = cfg.init
    reward_head = value_head = None
    if cfg.score.reward_model:
        reward_head = load_scalar_head_adapter(model, cfg.score.reward_model, REWARD, trainable=False)
    if value and cfg.score.reward_model:
        value_head = load_scalar_head_adapter(model, cfg.score.reward_model, VALUE, trainable=True)
    elif value:
        if sft_adapter:
            load_adapter(model, sft_adapter, VALUE, trainable=True)
        else:
            model.add_adapter(VALUE, lora_config(cfg.adapter))
            model.set_requires_grad([VALUE], True)
        value_head = torch.nn.Linear(base.config.hidden_size, 1, bias=False)
        torch.nn.init.zeros_(value_head.weight)
    for module in model.modules():  # no dropout anywhere: rollout and update log-probs must agree
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    roles = Roles(model, value_head.to(device) if value_head is not None else None,
                  reward_head.to(device) if reward_head is not None else None,
                  (POLICY, VALUE) if value else (POLICY,))
    roles.use(POLICY)
    return roles


def scalar_head(roles: Roles, head: torch.nn.Linear, input_ids, attention_mask) -> torch.Tensor:
    """``[B, T]`` head outputs at every position with the active adapter."""
    hidden = backbone_hidden_states(roles.model, input_ids, attention_mask)
    return head(hidden.to(head.weight.dtype)).squeeze(-1)


class AdapterRewardModel:
    """The ``reward`` role as a reward model for ``finetune.scorers.RewardModelScorer``: conversations rendered with
    the template (as the reward run trained), scored at their last token by the reward adapter and head; an empty
    reply is scored too (as :meth:`finetune.reward_model.RewardModel.encode` renders it)."""

    def __init__(self, roles: Roles, tokenizer, template):
        self.roles, self.tokenizer, self.template = roles, tokenizer, template

    @torch.no_grad()
    def score(self, conversations, batch_size: int = 16) -> list[float]:
        from .generation import left_pad

        device = next(self.roles.model.parameters()).device
        scores: list[float] = []
        self.roles.use(REWARD)
        try:
            for start in range(0, len(conversations), batch_size):
                ids = [render(self.template, list(c), self.tokenizer, empty_reply=True)[0]
                       for c in conversations[start : start + batch_size]]
                input_ids, mask = left_pad(ids, self.tokenizer.pad_token_id)  # left: the last token is at T-1
                values = scalar_head(self.roles, self.roles.reward_head, input_ids.to(device), mask.to(device))
                scores.extend(values[:, -1].float().cpu().tolist())
        finally:
            self.roles.use(POLICY)
        return scores
