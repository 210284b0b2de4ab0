"""Activation checkpointing per decoder layer: none, full, or selective (keep the expensive, recompute the cheap).

``full`` recomputes each decoder layer's whole forward during the backward: least memory, about one extra forward
of compute. ``selective`` is what the LLaMA paper describes (Touvron et al. 2023, https://arxiv.org/abs/2302.13971,
section 2.4: "we save the activations that are expensive to compute, such as the outputs of linear layers"): inside
each checkpointed layer the outputs of the matrix multiplications (the q/k/v/o and gate/up/down projections, their
LoRA factors included) and of the fused attention kernel are kept, and only the cheap element-wise work (RMSNorm,
RoPE, SiLU and the gating product, residual adds, dtype casts, 4-bit dequantisation) is recomputed. With the
eager attention backend its score matmuls and softmax are recomputed too (they are ``bmm``, not kept: the ``[T, T]``
scores are the largest activation there is).

It is PyTorch's selective activation checkpointing (``torch.utils.checkpoint.create_selective_checkpoint_contexts``)
with a policy on aten ops, passed as the ``context_fn`` of the non-reentrant ``checkpoint`` that transformers wraps
around every decoder layer. The policy is installed on the model instance, so every later call that turns
checkpointing on (``Trainer``, TRL, PEFT's k-bit preparation) turns on the selective kind.

TRL's own ``gradient_checkpointing_kwargs={"selective": True}`` keeps only the attention output and recomputes the
linear layers as well: less memory than ours, more recompute. ``benchmarks/checkpointing.py`` measures the three
modes here side by side.
"""

from __future__ import annotations

import functools

__all__ = ["MODES", "checkpointing_mode", "enable_activation_checkpointing", "selective_context_fn", "selective_policy"]

MODES = ("none", "full", "selective")

# Aten ops whose outputs the selective policy keeps: the matmuls of linear layers (``F.linear`` reaches the
# dispatcher as ``mm`` / ``addmm``) and the fused attention kernels (every SDPA backend; FlashAttention's own ops are
# matched by name below, since they register under versioned namespaces).
_KEPT_OP_NAMES = (
    "mm",
    "addmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
)


@functools.cache
def _kept_ops() -> frozenset:
    import torch

    return frozenset(
        packet.default for name in _KEPT_OP_NAMES if (packet := getattr(torch.ops.aten, name, None)) is not None
    )


def selective_policy(ctx, op, *args, **kwargs):
    """The selective checkpointing policy: keep matmul and fused-attention outputs, recompute everything else.

    Args:
        ctx: ``torch.utils.checkpoint.SelectiveCheckpointContext`` (unused: forward and recompute decide alike).
        op: the aten op overload being run.

    Returns:
        ``CheckpointPolicy.MUST_SAVE`` or ``CheckpointPolicy.PREFER_RECOMPUTE``.
    """
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _kept_ops() or "flash_attn" in str(op):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def selective_context_fn():
    """The ``context_fn`` for ``torch.utils.checkpoint.checkpoint``: a fresh pair of selective contexts per call."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(selective_policy)


def checkpointing_mode(model_cfg) -> str:
    """The activation checkpointing a :class:`finetune.config.ModelConfig` asks for: ``activation_checkpointing``
    when set, else ``full`` if the older ``gradient_checkpointing`` flag is on, else ``none``."""
    mode = getattr(model_cfg, "activation_checkpointing", None)
    if mode is None:
        return "full" if getattr(model_cfg, "gradient_checkpointing", False) else "none"
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _enable_method(model) -> tuple[str, str]:
    """The enabling method a transformers model has, and the name of its kwargs argument: transformers >= 5.x has
    ``activation_checkpointing_enable`` (its ``gradient_checkpointing_enable`` delegates to it), older ones only
    ``gradient_checkpointing_enable``."""
    if hasattr(model, "activation_checkpointing_enable"):
        return "activation_checkpointing_enable", "activation_checkpointing_kwargs"
    return "gradient_checkpointing_enable", "gradient_checkpointing_kwargs"


def _install_selective(model) -> None:
    """Wrap the model instance's enabling method so that every call (ours, the Trainer's, PEFT's) gets the selective
    ``context_fn`` and non-reentrant checkpointing, which selective checkpointing needs. Idempotent."""
    name, kwarg = _enable_method(model)
    original = getattr(model, name)
    if getattr(original, "_finetune_selective", False):
        return

    @functools.wraps(original)
    def enable(*args, **kwargs):
        ckpt_kwargs = dict((args[0] if args else kwargs.pop(kwarg, None)) or {})
        args = args[1:]
        ckpt_kwargs.pop("selective", None)  # TRL's flag for its own (attention-only) policy
        ckpt_kwargs["use_reentrant"] = False
        ckpt_kwargs["context_fn"] = selective_context_fn
        return original(*args, **{kwarg: ckpt_kwargs}, **kwargs)

    enable._finetune_selective = True
    setattr(model, name, enable)


def enable_activation_checkpointing(model, mode: str) -> None:
    """Turn on activation checkpointing of kind ``mode`` on every decoder layer of a transformers model.

    Args:
        model: a ``PreTrainedModel`` (before or after wrapping in PEFT: a ``PeftModel`` forwards the call).
        mode: ``none`` (nothing is changed), ``full`` or ``selective``.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "none":
        return
    target = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if mode == "selective":
        _install_selective(target)
    name, kwarg = _enable_method(target)
    getattr(target, name)(**{kwarg: {"use_reentrant": False}})
