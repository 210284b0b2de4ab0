"""Tests for finetune.logprobs: numbers worked out by hand, plus parity with the naive full-logits computation."""

import math

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.testing import assert_close

from finetune.logprobs import (
    chunked_entropy,
    chunked_token_logprobs,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    shift_for_causal_lm,
    token_logprobs,
    top_k_support,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def naive_token_logprobs(logits, labels, ignore_index=-100):
    """Reference: full float32 log_softmax, gather, zero the ignored positions."""
    ignored = labels == ignore_index
    logp = (
        logits.to(torch.promote_types(logits.dtype, torch.float32))
        .log_softmax(-1)
        .gather(-1, labels.masked_fill(ignored, 0).unsqueeze(-1))
        .squeeze(-1)
    )
    return logp.masked_fill(ignored, 0.0)


def test_token_logprobs_hand_worked():
    """Vocab 3, every position has probabilities (1/2, 1/4, 1/4); logits are their logs plus 7 (a shift changes
    nothing). Labels [0, 1, -100] give [ln 1/2, ln 1/4, 0] = [-0.6931, -1.3863, 0]."""
    logits = (torch.tensor([0.5, 0.25, 0.25]).log() + 7.0).expand(1, 3, 3)
    labels = torch.tensor([[0, 1, -100]])
    assert_close(token_logprobs(logits, labels), torch.tensor([[-LN2, -2 * LN2, 0.0]]))


def test_token_logprobs_matches_log_softmax_and_upcasts_bf16():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11) * 4
    labels = torch.randint(0, 11, (3, 5))
    labels[0, :2] = -100
    labels[2, -1] = -100
    assert_close(token_logprobs(logits, labels), naive_token_logprobs(logits, labels))
    bf16 = logits.bfloat16()
    out = token_logprobs(bf16, labels)
    assert out.dtype == torch.float32
    assert_close(out, naive_token_logprobs(bf16, labels))  # same bf16 values, upcast before the softmax


def test_shift_for_causal_lm():
    logits, labels = torch.randn(2, 4, 3), torch.arange(8).view(2, 4)
    shifted_logits, shifted_labels = shift_for_causal_lm(logits, labels)
    assert_close(shifted_logits, logits[:, :3])
    assert_close(shifted_labels, torch.tensor([[1, 2, 3], [5, 6, 7]]))


def test_sequence_logprobs_hand_worked():
    """Vocab 2. Logits rows [ln 3, 0] give p = (3/4, 1/4); [0, 0] gives (1/2, 1/2).
    Row 0: labels [-100, 0, 1, -100], logits [[ln3,0], [ln3,0], [0,0], junk]. After the shift, position 0 scores
    label 0 (ln 3/4), position 1 scores label 1 (ln 1/4), position 2 scores -100 (skipped), the last logits are unused:
    sum = ln(3/16) = -1.6740, mean over 2 tokens = -0.8370.
    Row 1: labels [0, 1, 1, 1] (the first label is never scored), logits all [0, 0]: 3 tokens of ln 1/2:
    sum = -3 ln 2 = -2.0794, mean = -0.6931.
    Row 2: all -100: sum 0, mean 0."""
    logits = torch.zeros(3, 4, 2)
    logits[0, 0, 0] = logits[0, 1, 0] = LN3
    logits[0, 3] = torch.tensor([50.0, -50.0])
    labels = torch.tensor([[-100, 0, 1, -100], [0, 1, 1, 1], [-100, -100, -100, -100]])
    assert_close(sequence_logprobs(logits, labels), torch.tensor([math.log(3 / 16), -3 * LN2, 0.0]))
    assert_close(sequence_logprobs(logits, labels, average=True), torch.tensor([math.log(3 / 16) / 2, -LN2, 0.0]))


def naive_chunk_reference(hidden, weight, labels):
    """Reference: the full [B, T, V] logits, then the naive log_softmax gather."""
    return naive_token_logprobs(hidden @ weight.t(), labels)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 12, 1000])
def test_chunked_token_logprobs_values_and_grads_match_full_logits(chunk_size):
    """B=2, T=6 (12 tokens) with masked positions, in float64: values and the gradients w.r.t. hidden states and
    weight equal the full-logits computation. Chunk size 5 does not divide 12 (5 + 5 + 2); 1000 is a single chunk."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 13, (2, 6))
    labels[0, :2] = -100
    labels[1, 5] = -100
    upstream = torch.randn(2, 6, dtype=torch.float64)

    out = chunked_token_logprobs(hidden, weight, labels, chunk_size=chunk_size)
    grads = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
    expected = naive_chunk_reference(hidden, weight, labels)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    assert out.dtype == torch.float64
    assert_close(out, expected)
    assert_close(grads, expected_grads)


def test_chunked_token_logprobs_float32_chunk_not_dividing_tokens():
    """15 tokens in chunks of 7 (7 + 7 + 1), float32: values and grads equal the full computation."""
    torch.manual_seed(1)
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    weight = torch.randn(9, 4, requires_grad=True)
    labels = torch.randint(0, 9, (3, 5))
    labels[:, 0] = -100
    out = chunked_token_logprobs(hidden, weight, labels, chunk_size=7)
    expected = naive_chunk_reference(hidden, weight, labels)
    assert out.dtype == torch.float32
    assert_close(out, expected)
    assert_close(
        torch.autograd.grad(out.sum(), (hidden, weight)), torch.autograd.grad(expected.sum(), (hidden, weight))
    )


def test_chunked_token_logprobs_keeps_no_logits_for_backward():
    """Under checkpointing, autograd may keep only the chunk inputs (views of hidden, weight, labels) for the
    backward: no tensor it saves is a new allocation such as a chunk of logits."""
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(50, 4, requires_grad=True)
    labels = torch.randint(0, 50, (2, 5))
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, weight, labels)}
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_token_logprobs(hidden, weight, labels, chunk_size=3)
    assert saved
    assert all(t.untyped_storage().data_ptr() in inputs for t in saved)


def test_chunked_token_logprobs_no_grad_path():
    hidden, weight = torch.randn(1, 4, 3), torch.randn(6, 3)
    labels = torch.tensor([[1, -100, 5, 0]])
    with torch.no_grad():
        out = chunked_token_logprobs(hidden, weight, labels, chunk_size=3)
    assert_close(out, naive_chunk_reference(hidden, weight, labels))


def test_entropy_from_logits_hand_worked():
    """Vocab 2. [0, 0]: p = (1/2, 1/2), H = ln 2 = 0.6931. [ln 3, 0] and [0, ln 3]: p = (3/4, 1/4),
    H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 2 ln 2 - (3/4) ln 3 = 0.5623. bf16 input still gives float32."""
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [0.0, LN3]]])
    expected = torch.tensor([[LN2, 2 * LN2 - 0.75 * LN3, 2 * LN2 - 0.75 * LN3]])
    assert_close(entropy_from_logits(logits, chunk_size=2), expected)
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_chunked_entropy_values_and_grads_match_full_logits(chunk_size):
    """[2, 6, 8] hidden states (12 positions: chunks of 5 give 5 + 5 + 2) and a 13-token head in float64: the
    entropies and their gradients w.r.t. hidden states and weight equal entropy_from_logits of the full logits."""
    torch.manual_seed(2)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(2, 6, dtype=torch.float64)
    out = chunked_entropy(hidden, weight, chunk_size=chunk_size)
    expected = entropy_from_logits(hidden @ weight.t())
    assert out.shape == (2, 6) and out.dtype == torch.float64
    assert_close(out, expected)
    assert_close(torch.autograd.grad((out * upstream).sum(), (hidden, weight)),
                 torch.autograd.grad((expected * upstream).sum(), (hidden, weight)))


def test_chunked_entropy_hand_worked_and_lean():
    """Hidden [1, 0] and [0, 1] against a head with rows [0, 0] and [ln 3, 0]: logits [0, ln 3] (H = 2 ln 2 -
    (3/4) ln 3) and [0, 0] (H = ln 2); bf16 inputs give float32; an empty batch gives an empty result; and under
    autograd only views of the inputs are saved for the backward (no chunk of logits)."""
    hidden = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    assert_close(chunked_entropy(hidden, weight, chunk_size=1), torch.tensor([2 * LN2 - 0.75 * LN3, LN2]))
    assert chunked_entropy(hidden.bfloat16(), weight.bfloat16()).dtype == torch.float32
    assert chunked_entropy(torch.zeros(0, 2), weight).shape == (0,)
    hidden, weight = torch.randn(2, 5, 4, requires_grad=True), torch.randn(50, 4, requires_grad=True)
    inputs = {t.untyped_storage().data_ptr() for t in (hidden, weight)}
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_entropy(hidden, weight, chunk_size=3)
    assert saved and all(t.untyped_storage().data_ptr() in inputs for t in saved)


def test_masked_sum_mean_var_hand_worked():
    """values [1, 2, 3, 100], mask [1, 1, 1, 0]: sum 6, mean 2, squared deviations 1 + 0 + 1 = 2, so unbiased var
    2 / 2 = 1 and biased var 2 / 3. Along dim 1 on [[1, 2], [3, nan]] with mask [[1, 1], [0, 0]]: sums [3, 0],
    means [1.5, 0] (an empty row gives 0, and the NaN under the mask is ignored)."""
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert_close(masked_sum(values, mask), torch.tensor(6.0))
    assert_close(masked_mean(values, mask), torch.tensor(2.0))
    assert_close(masked_var(values, mask), torch.tensor(1.0))
    assert_close(masked_var(values, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    rows = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    row_mask = torch.tensor([[True, True], [False, False]])
    assert_close(masked_sum(rows, row_mask, dim=1), torch.tensor([3.0, 0.0]))
    assert_close(masked_mean(rows, row_mask, dim=1), torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError):
        masked_var(values, torch.tensor([0, 0, 1, 0]))


def test_masked_whiten():
    """Over the mask the result has mean 0 and (unbiased) std 1, it is 0 outside the mask, and changing the values
    outside the mask changes nothing. With shift_mean=False the masked mean is kept."""
    torch.manual_seed(0)
    values = torch.randn(4, 6) * 3 + 5
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 2:] = False
    out = masked_whiten(values, mask)
    assert_close(out[mask].mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(out[mask].std(), torch.tensor(1.0))
    assert_close(out[~mask], torch.zeros(int((~mask).sum())))
    assert_close(masked_whiten(values.masked_fill(~mask, 1e6), mask), out)
    kept = masked_whiten(values, mask, shift_mean=False)
    assert_close(kept[mask].mean(), values[mask].mean())
    assert_close(kept[mask].std(), torch.tensor(1.0))


def test_masked_whiten_hand_worked():
    """values [1, 2, 3, 6, pad]: mean 3, squared deviations 4 + 1 + 0 + 9 = 14, unbiased var 14 / 3, so the
    whitened values are (x - 3) / sqrt(14 / 3) = [-0.9258, -0.4629, 0, 1.3887] and 0 on the padding."""
    values = torch.tensor([1.0, 2.0, 3.0, 6.0, 50.0])
    mask = torch.tensor([1, 1, 1, 1, 0])
    std = math.sqrt(14 / 3)
    assert_close(masked_whiten(values, mask, eps=0.0), torch.tensor([-2 / std, -1 / std, 0.0, 3 / std, 0.0]))
    assert_close(masked_whiten(values, mask, shift_mean=False, eps=0.0),
                 torch.tensor([-2 / std + 3, -1 / std + 3, 3.0, 3 / std + 3, 0.0]))
    with pytest.raises(ValueError, match="1 position"):
        masked_whiten(values, torch.tensor([0, 0, 1, 0, 0]))


def test_masked_whiten_sums_statistics_across_processes():
    """Two processes each holding [1, 3] (a stand-in all-reduce that doubles every sum): the statistics are those of
    [1, 3, 1, 3], mean 2 and unbiased var (1 + 1 + 1 + 1) / 3 = 4 / 3, so 1 -> -1 / sqrt(4 / 3) = -0.8660; one
    process alone has var 2 / 1 and gives -1 / sqrt(2) = -0.7071. The stand-in sees (sum, count) first, then the
    squared deviations."""
    values, mask = torch.tensor([1.0, 3.0]), torch.ones(2)
    seen = []
    doubled = masked_whiten(values, mask, eps=0.0, sum_across_processes=lambda t: seen.append(t.clone()) or 2 * t)
    assert_close(doubled, torch.tensor([-1.0, 1.0]) / math.sqrt(4 / 3))
    assert_close(masked_whiten(values, mask, eps=0.0), torch.tensor([-1.0, 1.0]) / math.sqrt(2.0))
    assert_close(seen, [torch.tensor([4.0, 2.0]), torch.tensor(2.0)])


def test_support_logprobs_and_entropy_hand_worked():
    """Logits [2, 0, 1, -1] (hidden = the logits, head = identity) over the support {0, 2}: the distribution is
    softmax([2, 1]), so token 0 has log-prob -log(1 + e^-1) and token 2 has -log(1 + e), the entropy is that of
    (1, e^-1) / (1 + e^-1); an ignored position gives 0."""
    hidden = torch.tensor([[[2.0, 0.0, 1.0, -1.0]] * 3], dtype=torch.float64)
    weight = torch.eye(4, dtype=torch.float64)
    support = torch.tensor([[[0, 2]] * 3])
    labels = torch.tensor([[0, 2, -100]])
    out = chunked_token_logprobs(hidden, weight, labels, chunk_size=2, support=support)
    assert_close(out, torch.tensor([[-math.log1p(math.exp(-1)), -math.log1p(math.e), 0.0]], dtype=torch.float64))
    p = 1 / (1 + math.exp(-1))
    expected_entropy = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert_close(chunked_entropy(hidden, weight, support=support), torch.full((1, 3), expected_entropy, dtype=torch.float64))


@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_support_logprobs_equal_masked_full_logits_values_and_grads(chunk_size):
    """Over a random support of 4 of 13 tokens (containing the label), the chunked log-probs and entropies and their
    gradients equal those of the full logits with every other token masked to -inf."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    support = torch.stack([torch.randperm(13)[:4] for _ in range(12)]).view(2, 6, 4)
    labels = support[..., 1].clone()
    labels[0, :2] = -100
    upstream = torch.randn(2, 6, dtype=torch.float64)

    logits = hidden @ weight.t()
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, support, False)
    masked = logits.masked_fill(outside, float("-inf"))
    expected = naive_token_logprobs(masked, labels)
    out = chunked_token_logprobs(hidden, weight, labels, chunk_size=chunk_size, support=support)
    assert_close(out, expected)
    assert_close(torch.autograd.grad((out * upstream).sum(), (hidden, weight)),
                 torch.autograd.grad((expected * upstream).sum(), (hidden, weight)))

    far_below = (hidden @ weight.t()).masked_fill(outside, -1e30)  # exp() is exactly 0, with finite gradients
    expected_entropy = -(far_below.softmax(-1) * far_below.log_softmax(-1)).sum(-1)
    entropy = chunked_entropy(hidden, weight, chunk_size=chunk_size, support=support)
    assert_close(entropy, expected_entropy)
    assert_close(torch.autograd.grad((entropy * upstream).sum(), (hidden, weight)),
                 torch.autograd.grad((expected_entropy * upstream).sum(), (hidden, weight)))


def test_top_k_support_is_the_k_largest_logits_with_the_label_kept():
    """Logits [0, 3, 1, 2]: the top 2 are tokens 1 and 3. A label among them leaves them as they are; label 0 (what a
    sampler whose k-th logit tied differently could draw) replaces the second; an ignored position keeps the top 2.
    With k equal to the vocabulary the support log-probs are the full ones."""
    hidden = torch.tensor([[[0.0, 3.0, 1.0, 2.0]] * 3])
    weight = torch.eye(4)
    labels = torch.tensor([[3, 0, -100]])
    support = top_k_support(hidden, weight, 2, labels, chunk_size=2)
    assert support.tolist() == [[[1, 3], [1, 0], [1, 3]]]
    full = top_k_support(hidden, weight, 4, labels)
    assert_close(chunked_token_logprobs(hidden, weight, labels, support=full), chunked_token_logprobs(hidden, weight, labels))
    with pytest.raises(ValueError, match="k must be in"):
        top_k_support(hidden, weight, 5, labels)
