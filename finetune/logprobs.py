"""Log-probabilities, entropies and masked statistics: the tensor maths shared by SFT, DPO, PPO and evaluation.

Every function here is pure (tensors in, tensors out, no trainer or config object), but for the last section's, which take
a model and read its hidden states and plain ``lm_head`` in chunks, so the full logits never exist.

Alignment convention. ``token_logprobs`` and ``chunked_token_logprobs`` take labels that are ALREADY aligned with
the logits / hidden states (position ``t`` of the logits scores ``labels[:, t]``). ``sequence_logprobs`` (and the
test oracle ``sft_loss`` in ``tests/loss_oracles.py``) take the raw model output together with
``labels == input_ids`` (prompt and padding set to ``ignore_index``), as Hugging Face causal LMs do, and apply the causal shift themselves with
``shift_for_causal_lm``: the logits at position ``t`` predict the token at ``t + 1``.

Masks are 0/1 tensors (bool or float) of the same shape as the values they mask; "masked positions" below means
positions where the mask is 1, i.e. the positions that count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "auto_chunk_size",
    "chunked_entropy",
    "chunked_token_logprobs",
    "entropy_from_logits",
    "has_plain_lm_head",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_token_logprobs",
    "sequence_logprobs",
    "shift_for_causal_lm",
    "token_logprobs",
    "top_k_support",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather_logprobs(logits: Tensor, labels: Tensor, ignore_index: int, support: Tensor | None = None) -> Tensor:
    """``log_softmax(logits)[label]`` as ``logits[label] - logsumexp(logits)``, 0 where ``label == ignore_index``.

    Args:
        logits: ``[N, V]`` in any floating dtype; upcast to float32 here, one call's worth at a time.
        labels: ``[N]`` token ids aligned with ``logits``.
        ignore_index: label value that marks positions to skip.
        support: optional ``[N, k]`` token ids to normalise over instead of the whole vocabulary (each label among
            its row's ids).

    Returns:
        ``[N]`` float32 (float64 for float64 logits) log-probabilities.
    """
    logits = logits.to(_compute_dtype(logits.dtype))
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    chosen = logits.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    normaliser = logits if support is None else logits.gather(-1, support)
    return (chosen - normaliser.logsumexp(dim=-1)).masked_fill(ignored, 0.0)


def token_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Log-probability of each label token under ``logits``; labels must already be aligned (no shift here).

    Computed as ``logits.gather(label) - logits.logsumexp()`` one batch row at a time, so at most one row of
    ``[T, V]`` float32 temporaries exists at once instead of a full ``[B, T, V]`` float32 ``log_softmax`` copy.
    (With autograd on, each row's float32 upcast of bf16/fp16 logits is kept for the backward; use
    ``chunked_token_logprobs`` when that is too much.)

    Args:
        logits: ``[B, T, V]`` logits in any floating dtype.
        labels: ``[B, T]`` token ids, ``labels[:, t]`` scored by ``logits[:, t]``. Use ``shift_for_causal_lm`` first
            when ``labels`` are the model's input ids.
        ignore_index: label value whose positions get log-prob 0 (the HF / PyTorch convention, -100).

    Returns:
        ``[B, T]`` float32 per-token log-probs (float64 for float64 logits), 0 at ignored positions.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} (want [B, T, V] / [B, T])"
        )
    rows = [_gather_logprobs(row, row_labels, ignore_index) for row, row_labels in zip(logits, labels, strict=True)]
    if not rows:
        return logits.new_zeros(labels.shape, dtype=_compute_dtype(logits.dtype))
    return torch.stack(rows)


def shift_for_causal_lm(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align a causal LM's logits with its labels: the logits at position ``t`` predict the token at ``t + 1``.

    Args:
        logits: ``[B, T, V]`` model output.
        labels: ``[B, T]`` the input ids with non-trained positions set to the ignore index.

    Returns:
        ``(logits[:, :-1], labels[:, 1:])``: ``[B, T-1, V]`` and ``[B, T-1]`` views (no copy).
    """
    return logits[:, :-1], labels[:, 1:]


def sequence_logprobs(logits: Tensor, labels: Tensor, ignore_index: int = -100, average: bool = False) -> Tensor:
    """Log-probability of each sequence's trained tokens, with the causal shift done here.

    ``labels`` is what a Hugging Face causal LM takes as ``labels``: the input ids, with the prompt and padding set to
    ``ignore_index``. The logits at position ``t`` score ``labels[:, t + 1]`` (see ``shift_for_causal_lm``), so the
    last position's logits are never used and the first label is never scored. This is the quantity DPO, rejection
    sampling and evaluation need (``log pi(response | prompt)``).

    Args:
        logits: ``[B, T, V]`` model output for ``input_ids`` of shape ``[B, T]``.
        labels: ``[B, T]`` unshifted labels.
        ignore_index: label value of positions that do not count.
        average: if True, divide the sum by the number of counted tokens (the per-token mean that IPO and
            length-normalised variants use); a row with no counted token gives 0.

    Returns:
        ``[B]`` float32 sum (or mean) of per-token log-probs over positions whose shifted label is not ignored.
    """
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    per_token = token_logprobs(shifted_logits, shifted_labels, ignore_index)
    total = per_token.sum(dim=-1)
    if not average:
        return total
    counts = (shifted_labels != ignore_index).sum(dim=-1).clamp(min=1)
    return total / counts


def chunked_token_logprobs(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    support: Tensor | None = None,
) -> Tensor:
    """Per-token log-probs straight from the final hidden states, never building the full ``[B, T, V]`` logits.

    The ``B * T`` token positions are flattened and processed ``chunk_size`` at a time: each chunk computes its
    ``[chunk_size, V]`` logits (``hidden @ weight.T``, upcast to float32), gathers the label log-probs and drops the
    logits. Each chunk runs under ``torch.utils.checkpoint`` (``use_reentrant=False``), so autograd stores only the
    chunk's inputs and recomputes its logits during the backward, one chunk at a time: peak memory is one chunk of
    logits, in the forward and in the backward. Gradients flow to both ``hidden_states`` and ``lm_head_weight`` (so
    it works with LoRA on the base model and with a trainable or tied head). This is the same idea as litgpt's
    ``chunked_cross_entropy`` and Liger's fused linear cross entropy, in plain PyTorch.

    Args:
        hidden_states: ``[B, T, H]`` final hidden states (after the final norm), ALREADY aligned with ``labels``:
            for a causal LM pass ``hidden[:, :-1]`` with ``labels[:, 1:]``.
        lm_head_weight: ``[V, H]`` output projection (``model.lm_head.weight``); no bias.
        labels: ``[B, T]`` token ids; ``ignore_index`` positions give 0.
        chunk_size: token positions per chunk; need not divide ``B * T``.
        ignore_index: label value of positions to skip.
        support: optional ``[B, T, k]`` token ids (:func:`top_k_support`): each position's distribution is then the
            softmax over those k logits only, the distribution top-k sampling draws from. Every counted label must be
            among its position's ids.

    Returns:
        ``[B, T]`` float32 (float64 for float64 inputs) per-token log-probs, equal to
        ``token_logprobs(hidden_states @ lm_head_weight.T, labels)`` (with ``support``: the log-probs of the logits
        gathered at ``support``).
    """
    batch, seq, _ = hidden_states.shape
    if labels.shape != (batch, seq):
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden_states {tuple(hidden_states.shape)}")
    chunk = functools.partial(_chunk_logprobs, ignore_index=ignore_index)
    per_position = (labels,) if support is None else (labels, support)
    return _map_position_chunks(chunk, hidden_states, lm_head_weight, chunk_size, *per_position)


@torch.no_grad()
def top_k_support(
    hidden_states: Tensor, lm_head_weight: Tensor, k: int, labels: Tensor, chunk_size: int = 1024,
    ignore_index: int = -100,
) -> Tensor:
    """The ids of the ``k`` largest logits at each position: the tokens top-k sampling draws from.

    Where a position's label is not among them (a near-tie at the k-th logit that the sampler, whose cached
    forward differs in the last bits, broke the other way), it replaces the k-th id, so the sampled token is always in
    its position's support. Chunked like :func:`chunked_token_logprobs`; no gradients.

    Args:
        hidden_states: ``[B, T, H]`` final hidden states, aligned with ``labels``.
        lm_head_weight: ``[V, H]`` output projection.
        k: support size, at most ``V``.
        labels: ``[B, T]`` the sampled tokens; ``ignore_index`` positions keep their plain top k.
        chunk_size: positions per chunk.

    Returns:
        ``[B, T, k]`` int64 token ids, largest logit first.
    """
    if not 1 <= k <= lm_head_weight.shape[0]:
        raise ValueError(f"k must be in [1, {lm_head_weight.shape[0]}], got {k}")
    chunk = functools.partial(_chunk_top_k, k=k, ignore_index=ignore_index)
    return _map_position_chunks(chunk, hidden_states, lm_head_weight, chunk_size, labels)


def chunked_entropy(
    hidden_states: Tensor, lm_head_weight: Tensor, chunk_size: int = 1024, support: Tensor | None = None
) -> Tensor:
    """Entropy (nats) of the next-token distribution at each position, straight from the final hidden states.

    ``entropy_from_logits(hidden_states @ lm_head_weight.T)`` without ever holding the full logits: the positions are
    processed ``chunk_size`` at a time, each chunk checkpointed as in :func:`chunked_token_logprobs`, so the forward
    and the backward hold one chunk of float32 logits at a time. Divide ``hidden_states`` by a sampling temperature
    first to get the entropy of the tempered distribution.

    Args:
        hidden_states: ``[..., H]`` final hidden states (after the final norm).
        lm_head_weight: ``[V, H]`` output projection; no bias.
        chunk_size: positions per chunk.
        support: optional ``[..., k]`` token ids: the entropy of the softmax over those logits only.

    Returns:
        ``[...]`` float32 (float64 for float64 inputs) entropies.
    """
    per_position = () if support is None else (support,)
    return _map_position_chunks(_chunk_entropy, hidden_states, lm_head_weight, chunk_size, *per_position)


def _map_position_chunks(fn, hidden_states: Tensor, lm_head_weight: Tensor, chunk_size: int, *per_position: Tensor):
    """The one chunking loop behind :func:`chunked_token_logprobs` and :func:`chunked_entropy` (and, through the
    former, ``finetune.logprobs.policy_token_logprobs``).

    Flattens ``hidden_states`` ``[..., H]`` (and each ``per_position`` tensor ``[..., *rest]``) over positions and
    returns ``fn(hidden_chunk, lm_head_weight, *per_position_chunks)`` (``[n, *out]`` per chunk of ``n`` positions)
    joined back into ``[..., *out]``. With autograd on, each chunk is checkpointed (``use_reentrant=False``): only
    its inputs are kept and its logits are recomputed in the backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = hidden_states.shape[:-1]
    flat_hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    flat_extra = [t.reshape(flat_hidden.shape[0], *t.shape[len(shape):]) for t in per_position]
    use_checkpoint = torch.is_grad_enabled() and (hidden_states.requires_grad or lm_head_weight.requires_grad)
    chunks = []
    for start in range(0, flat_hidden.shape[0], chunk_size):
        args = (flat_hidden[start : start + chunk_size], lm_head_weight,
                *(t[start : start + chunk_size] for t in flat_extra))
        chunks.append(checkpoint(fn, *args, use_reentrant=False) if use_checkpoint else fn(*args))
    if not chunks:
        return hidden_states.new_zeros(shape, dtype=_compute_dtype(hidden_states.dtype))
    joined = torch.cat(chunks)
    return joined.view(*shape, *joined.shape[1:])


def _chunk_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, support: Tensor | None = None, *,
                    ignore_index: int) -> Tensor:
    """One chunk of ``chunked_token_logprobs``: ``[n, H]`` hidden, ``[V, H]`` weight, ``[n]`` labels (and ``[n, k]``
    support ids) -> ``[n]``."""
    return _gather_logprobs(hidden @ weight.t(), labels, ignore_index, support)


def _chunk_top_k(hidden: Tensor, weight: Tensor, labels: Tensor, k: int, ignore_index: int) -> Tensor:
    """One chunk of ``top_k_support``: ``[n, H]`` hidden, ``[n]`` labels -> ``[n, k]`` ids."""
    top = (hidden @ weight.t()).topk(k, dim=-1).indices
    missing = (labels != ignore_index) & ~(top == labels.unsqueeze(-1)).any(dim=-1)
    top[missing, -1] = labels[missing]
    return top


def _chunk_entropy(hidden: Tensor, weight: Tensor, support: Tensor | None = None) -> Tensor:
    """One chunk of ``chunked_entropy``: ``[n, H]`` hidden, ``[V, H]`` weight (and ``[n, k]`` support ids) -> ``[n]``."""
    logits = hidden @ weight.t()
    return _entropy(logits if support is None else logits.gather(-1, support))


def _entropy(logits: Tensor) -> Tensor:
    """``-sum_v p_v log p_v`` over the last dimension, in float32 (float64 for float64 logits)."""
    logp = logits.to(_compute_dtype(logits.dtype)).log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Entropy (nats) of the categorical distribution at each position, ``-sum_v p_v log p_v``.

    Rows of the flattened logits are processed ``chunk_size`` at a time in float32, so the float32 temporaries never
    cover the whole ``[..., V]`` tensor. (From hidden states, :func:`chunked_entropy` never builds the logits.)

    Args:
        logits: ``[..., V]`` logits in any floating dtype.
        chunk_size: flattened positions per chunk.

    Returns:
        ``[...]`` float32 (float64 for float64 logits) entropies.
    """
    vocab = logits.shape[-1]
    parts = [_entropy(chunk) for chunk in logits.reshape(-1, vocab).split(chunk_size, dim=0)]
    if not parts:
        return logits.new_zeros(logits.shape[:-1], dtype=_compute_dtype(logits.dtype))
    return torch.cat(parts).view(logits.shape[:-1])


def masked_sum(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``values`` where ``mask`` is 1.

    Args:
        values: ``[...]`` tensor.
        mask: 0/1 tensor (bool or numeric) of the same shape.
        dim: dimension to reduce; None reduces everything to a scalar.

    Returns:
        Scalar, or ``values`` reduced over ``dim``.
    """
    masked = torch.where(mask.bool(), values, torch.zeros_like(values))  # where, not *, so NaN/inf padding is dropped
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1; 0 where no position counts.

    Args:
        values: ``[...]`` tensor.
        mask: 0/1 tensor (bool or numeric) of the same shape.
        dim: dimension to reduce; None reduces everything to a scalar.

    Returns:
        Scalar, or ``values`` reduced over ``dim``. An empty mask (or an empty row along ``dim``) gives 0, not NaN,
        so an all-padding micro-batch cannot poison a loss.
    """
    count = masked_sum(torch.ones_like(values), mask, dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``values`` over all positions where ``mask`` is 1.

    Args:
        values: ``[...]`` tensor.
        mask: 0/1 tensor (bool or numeric) of the same shape.
        unbiased: apply Bessel's correction ``n / (n - 1)``.

    Returns:
        Scalar variance.

    Raises:
        ValueError: if the mask is empty, or holds a single position with ``unbiased=True`` (division by zero).
            The check reads the count back to the host.
    """
    count = masked_sum(torch.ones_like(values), mask)
    n = int(count.item())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var over {n} position(s) (unbiased={unbiased}) is undefined")
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        variance = variance * (count / (count - 1))
    return variance


def masked_whiten(
    values: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    sum_across_processes: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Normalise ``values`` to zero mean and unit (unbiased) std over the positions where ``mask`` is 1.

    PPO whitens advantages this way over all response tokens of the batch (``shift_mean=True``), and sometimes
    rewards with the mean kept (``shift_mean=False``): see "The N Implementation Details of RLHF with PPO"
    (https://iclr-blogposts.github.io/2024/blog/the-n-implementation-details-of-rlhf-with-ppo/). The statistics come
    only from masked positions, so padding never changes the result, and the output is set to 0 outside the mask so
    padding contributes nothing if the caller sums it.

    Under data parallelism each process holds part of the batch; pass ``sum_across_processes`` (an all-reduce sum,
    called in the same order on every process) and the mean and variance are those of every process's masked
    values together, as if one process held the whole batch. They are computed in two passes (sum and count, then
    the sum of squared deviations from the global mean), each one all-reduce, which keeps the variance as accurate
    as the one-process ``masked_var``.

    Args:
        values: ``[...]`` tensor, e.g. ``[B, T]`` advantages.
        mask: 0/1 tensor (bool or numeric) of the same shape, with at least two positions set (over all processes).
        shift_mean: subtract the mean (True) or only rescale around the existing mean (False).
        eps: added to the variance before the square root.
        sum_across_processes: ``tensor -> its sum over processes`` (e.g. ``accelerator.reduce(t, "sum")``); None
            for one process.

    Returns:
        Tensor shaped like ``values``: ``(values - mean) / sqrt(var + eps)`` (``+ mean`` when ``shift_mean`` is
        False) at masked positions, 0 elsewhere.

    Raises:
        ValueError: if fewer than two positions are set over all processes (the unbiased variance is undefined).
    """
    total = sum_across_processes or (lambda t: t)
    sum_and_count = total(torch.stack([masked_sum(values, mask), masked_sum(torch.ones_like(values), mask)]))
    count = sum_and_count[1]
    if count.item() < 2:
        raise ValueError(f"masked_whiten over {int(count.item())} position(s): the unbiased variance is undefined")
    mean = sum_and_count[0] / count
    variance = total(masked_sum((values - mean) ** 2, mask)) / (count - 1)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


# ---------------------------------------------------------------------------------------------------------------
# Memory-lean log-probs of a model (its hidden states and plain lm_head, never the full logits)


def _causal_lm(model):
    """The ``*ForCausalLM`` under a ``PeftModel`` (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def has_plain_lm_head(model) -> bool:
    """Whether the causal LM's head is a plain bias-free ``nn.Linear``, the only head :func:`policy_token_logprobs`
    can score from its weight (a LoRA-wrapped or biased head would be scored wrongly by the weight alone)."""
    import torch

    head = _causal_lm(model).get_output_embeddings()
    return type(head) is torch.nn.Linear and head.bias is None


def _plain_lm_head_weight(causal_lm):
    """``lm_head.weight``, or a clear error when :func:`has_plain_lm_head` is false."""
    head = causal_lm.get_output_embeddings()
    if not has_plain_lm_head(causal_lm):
        raise ValueError(
            f"policy_token_logprobs needs a plain bias-free nn.Linear lm_head; got {type(head).__name__}"
            " (leave lm_head out of adapter.target_modules)"
        )
    return head.weight


# Float32 logits one chunk may hold: 64 MiB is 130 positions of Llama 3's 128,256-token vocabulary.
CHUNK_LOGITS_BYTES = 64 * 2**20


def auto_chunk_size(vocab_size: int, budget_bytes: int = CHUNK_LOGITS_BYTES) -> int:
    """Positions per chunk so that one chunk's ``[chunk, vocab]`` float32 logits fit in ``budget_bytes`` (the
    log-softmax temporaries are about as large again)."""
    return max(1, budget_bytes // (4 * vocab_size))


def policy_token_logprobs(
    model,
    input_ids,
    attention_mask=None,
    labels=None,
    *,
    position_ids=None,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
):
    """Per-token log-probs of a causal LM's labels, never building the ``[B, T, V]`` logits.

    Runs the model body (with whatever adapter is active) to the final hidden states, then scores them against
    ``lm_head`` in chunks of ``chunk_size`` positions under activation checkpointing
    (:func:`finetune.logprobs.chunked_token_logprobs`): peak memory is one chunk of logits, in the forward and in the
    backward. Equal to ``token_logprobs(*shift_for_causal_lm(model(...).logits / temperature, labels))``.

    Args:
        model: a ``*ForCausalLM`` or a ``PeftModel`` around one, with a plain ``lm_head``.
        input_ids: ``[B, T]`` token ids.
        attention_mask: ``[B, T]`` 0/1 mask, or None (packed rows: pass ``position_ids`` restarting per document).
        labels: ``[B, T]`` unshifted labels (the HF convention: input ids with prompt and padding set to
            ``ignore_index``); None scores every token where ``attention_mask`` is 1.
        position_ids: ``[B, T]`` positions, for packed rows.
        chunk_size: token positions per chunk; None sizes chunks to 64 MiB of float32 logits
            (:func:`auto_chunk_size`).
        temperature: logits are divided by it (sampling temperature, as PPO's rollouts use).
        ignore_index: label value of positions that do not count.

    Returns:
        ``[B, T - 1]`` float32 log-probs: entry ``t`` scores ``labels[:, t + 1]``; 0 at ignored positions.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore_index)
    causal_lm = _causal_lm(model)
    weight = _plain_lm_head_weight(causal_lm)
    backbone = getattr(causal_lm, causal_lm.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).last_hidden_state
    hidden = hidden[:, :-1].to(weight.device)
    if temperature != 1.0:
        hidden = hidden / temperature  # (h / t) @ W.T == (h @ W.T) / t
    chunk_size = chunk_size or auto_chunk_size(weight.shape[0])
    return chunked_token_logprobs(hidden, weight, labels[:, 1:].to(weight.device), chunk_size, ignore_index)
