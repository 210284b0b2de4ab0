"""Which kernels a model runs on: the attention backend and Liger's fused LLaMA kernels.

Two things live here, each usable on its own (the memory-lean log-probs of a model, computed from its hidden
states, are :func:`finetune.logprobs.policy_token_logprobs`):

- :func:`resolve_attn_implementation` turns ``model.attn_implementation: auto`` into a concrete backend:
  FlashAttention 3 (Hopper) or 2 (Ampere and newer) on a CUDA GPU where the package, or transformers' ``kernels``
  fallback, is there and the dtype is bf16/fp16; PyTorch SDPA everywhere else. Packed, padding-free batches need no
  extra wiring: TRL's collator passes ``position_ids`` and ``cu_seq_lens_q/k``, which FlashAttention turns into its
  variable-length path, and which SDPA/eager turn into a block-diagonal causal mask (no mask given, no KV cache).
- :func:`apply_liger` puts Liger's fused RMSNorm, RoPE and SwiGLU on a LLaMA through transformers' own Liger hook
  (the one ``TrainingArguments(use_liger_kernel=True)`` calls). Liger's fused linear cross-entropy stays off: TRL's
  trainers already score through a fused, chunked LM head (``trl.trainer.utils.add_fused_lm_head``) and reject it,
  and our own loops use :func:`finetune.logprobs.policy_token_logprobs`.

Every choice is printed once per process (on the main process only), e.g.
``attention: flash_attention_2 (auto: CUDA sm80, flash-attn installed)`` or ``liger kernels: off (no CUDA GPU)``.
"""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass

__all__ = [
    "LIGER_LLAMA_KERNELS",
    "AttentionChoice",
    "LigerChoice",
    "announce",
    "apply_liger",
    "available_attention_backends",
    "choose_attention",
    "choose_liger",
    "resolve_attn_implementation",
]

FLASH_BACKENDS = ("flash_attention_3", "flash_attention_2")
PACKED_SDPA = "sdpa_packed"  # transformers' SDPA, one conversation at a time on a packed row

# Liger's LLaMA kernels we apply (kwargs of liger_kernel.transformers.apply_liger_kernel_to_llama). The two loss
# kernels stay off: TRL's trainers compute the loss through their own fused LM head and refuse Liger's, and plain
# cross-entropy over full logits is what we avoid everywhere else.
LIGER_LLAMA_KERNELS = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)


@functools.cache
def announce(message: str) -> None:
    """Print ``message`` on the main process of a distributed run (``RANK`` 0 or unset), to stderr: stdout carries
    what a command is for (a chat reply, rendered JSON) and must stay clean for pipes."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Attention backend


@dataclass(frozen=True)
class AttentionChoice:
    implementation: str
    """What goes to ``from_pretrained(attn_implementation=...)``."""
    reason: str
    """Why, in a few words (printed with the choice)."""


def choose_attention(
    requested: str,
    dtype,
    cuda: bool,
    capability: tuple[int, int] | None = None,
    flash3: bool = False,
    flash2: bool = False,
) -> AttentionChoice:
    """The attention backend for ``requested`` on a machine described by the arguments (pure: no probing).

    Args:
        requested: ``auto``, or a backend name passed through unchanged (``sdpa``, ``sdpa_packed``, ``eager``,
            ``flash_attention_2``, ``flash_attention_3``, a ``kernels-community/...`` hub kernel). ``auto`` picks
            FlashAttention where it can run, else ``sdpa_packed`` (:func:`packed_sdpa_attention_forward`).
        dtype: the model's compute dtype; FlashAttention runs in bf16/fp16 only.
        cuda: whether a CUDA GPU is available.
        capability: its compute capability ``(major, minor)``; FlashAttention 3 needs Hopper (9.x), 2 needs 8.0+.
        flash3: FlashAttention 3 is importable (``flash_attn_interface``, or transformers' kernels fallback).
        flash2: FlashAttention 2 is importable (``flash_attn``, or transformers' kernels fallback).

    Returns:
        The backend and the reason for it.
    """
    import torch

    if requested != "auto":
        return AttentionChoice(requested, "as configured")
    if not cuda:
        return AttentionChoice(PACKED_SDPA, "auto: no CUDA GPU")
    if dtype not in (torch.bfloat16, torch.float16):
        return AttentionChoice(PACKED_SDPA, f"auto: FlashAttention needs bf16/fp16, the model runs in {dtype}")
    major, minor = capability or (0, 0)
    if major == 9 and flash3:
        return AttentionChoice("flash_attention_3", f"auto: CUDA sm{major}{minor}, FlashAttention 3 available")
    if major >= 8 and flash2:
        return AttentionChoice("flash_attention_2", f"auto: CUDA sm{major}{minor}, FlashAttention 2 available")
    if major < 8:
        return AttentionChoice(PACKED_SDPA, f"auto: CUDA sm{major}{minor} is older than FlashAttention's sm80")
    return AttentionChoice(
        PACKED_SDPA, f"auto: CUDA sm{major}{minor} but no FlashAttention (pip install flash-attn, or the kernels package)"
    )


@functools.cache
def _flash_available(version: int) -> bool:
    """FlashAttention ``version`` importable here, from its package or transformers' hub-kernel fallback (which
    works offline only when the kernel is already in the local hub cache)."""
    try:
        from transformers.utils import import_utils
    except ImportError:
        return False
    probe = getattr(import_utils, f"is_flash_attn_{version}_available", None)
    if probe is None:
        return False
    try:
        return bool(probe(kernels_fallback_ok=True))
    except TypeError:  # transformers without the kernels fallback
        return bool(probe())
    except Exception:
        return False


def resolve_attn_implementation(requested: str, dtype) -> str:
    """The backend to load with for ``model.attn_implementation`` (``auto`` resolved on this machine); printed once.

    Args:
        requested: the configured value.
        dtype: the model's compute dtype (``finetune.models.resolve_dtype``).

    Returns:
        A value for ``from_pretrained(attn_implementation=...)``.
    """
    if requested == PACKED_SDPA:
        return register_packed_sdpa()
    if requested != "auto":
        return requested
    import torch

    cuda = torch.cuda.is_available()
    capability = torch.cuda.get_device_capability() if cuda else None
    wants_flash = cuda and dtype in (torch.bfloat16, torch.float16) and capability[0] >= 8
    choice = choose_attention(
        requested,
        dtype,
        cuda,
        capability,
        flash3=wants_flash and capability[0] == 9 and _flash_available(3),
        flash2=wants_flash and _flash_available(2),
    )
    announce(f"attention: {choice.implementation} ({choice.reason})")
    if choice.implementation == PACKED_SDPA:
        register_packed_sdpa()
    return choice.implementation


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None, **kwargs):
    """Transformers' SDPA attention, except on a padding-free packed row: there, causal SDPA over each conversation
    on its own.

    A packed row (batch of 1, ``cu_seq_lens_q == cu_seq_lens_k`` from TRL's padding-free collator) otherwise goes
    through SDPA with a block-diagonal mask over the whole row: work and memory in the square of the row's length,
    where FlashAttention's variable-length kernel does only the diagonal blocks. Without that kernel (a CPU, a GPU
    without flash-attn) this does the same with one SDPA call per conversation. Everything else (padded batches,
    generation with a KV cache) is ``sdpa_attention_forward`` unchanged.
    """
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    packed = (cu_seq_lens_q is not None and cu_seq_lens_k is not None and query.shape[0] == 1
              and query.shape[2] == key.shape[2] and cu_seq_lens_q.shape == cu_seq_lens_k.shape
              and bool(torch.equal(cu_seq_lens_q, cu_seq_lens_k)))
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bounds = cu_seq_lens_q.tolist()
    parts = [
        torch.nn.functional.scaled_dot_product_attention(query[:, :, start:end], key[:, :, start:end],
                                                         value[:, :, start:end], dropout_p=dropout, scale=scaling,
                                                         is_causal=True)
        for start, end in zip(bounds, bounds[1:]) if end > start
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


@functools.cache
def register_packed_sdpa() -> str:
    """Register :func:`packed_sdpa_attention_forward` with transformers as ``sdpa_packed`` (SDPA's mask function
    for the other batches); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
    return PACKED_SDPA


def available_attention_backends() -> list[str]:
    """Backends that run on this machine: ``sdpa``, ``sdpa_packed`` and ``eager`` everywhere, plus FlashAttention on
    a GPU that has it (bf16). What the packed-equals-unpacked test goes over."""
    import torch

    backends = ["sdpa", PACKED_SDPA, "eager"]
    if torch.cuda.is_available():
        major, _ = torch.cuda.get_device_capability()
        if major == 9 and _flash_available(3):
            backends.append("flash_attention_3")
        if major >= 8 and _flash_available(2):
            backends.append("flash_attention_2")
    return backends


# ---------------------------------------------------------------------------------------------------------------
# Liger


@dataclass(frozen=True)
class LigerChoice:
    on: bool
    reason: str


def choose_liger(requested: bool, cuda: bool, installed: bool) -> LigerChoice:
    """Whether to apply Liger's kernels (pure). They are Triton kernels: CUDA only."""
    if not requested:
        return LigerChoice(False, "off (model.use_liger is false)")
    if not cuda:
        return LigerChoice(False, "off (no CUDA GPU; the model runs unfused)")
    if not installed:
        return LigerChoice(False, "off (liger-kernel is not installed: pip install -e '.[gpu]')")
    return LigerChoice(True, "on (fused RMSNorm, RoPE, SwiGLU)")


def apply_liger(model, requested: bool = True) -> bool:
    """Put Liger's fused RMSNorm, RoPE and SwiGLU on ``model`` when ``requested`` and they can run; print the outcome
    once. Returns whether they were applied.

    Goes through transformers' hook (``transformers.integrations.liger.apply_liger_kernel``, what
    ``use_liger_kernel=True`` runs in ``Trainer``), with :data:`LIGER_LLAMA_KERNELS`. Note that Liger patches the
    ``transformers.models.llama.modeling_llama`` module as well as this instance, so LLaMA models built afterwards in
    the same process get the kernels too.
    """
    import torch

    try:
        from transformers.utils import is_liger_kernel_available

        installed = is_liger_kernel_available()
    except ImportError:
        installed = False
    choice = choose_liger(requested, torch.cuda.is_available(), installed)
    if choice.on:
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(model, dict(LIGER_LLAMA_KERNELS))
    announce(f"liger kernels: {choice.reason}")
    return choice.on
