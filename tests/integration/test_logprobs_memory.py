"""Memory-lean log-probs through a real (tiny) model equal the naive full-logits computation, values and gradients."""

import pytest
import torch

from finetune.config import AdapterConfig, ModelConfig
from finetune.logprobs import policy_token_logprobs, sequence_logprobs, shift_for_causal_lm, token_logprobs
from finetune.models import load_base_model, lora_config


@pytest.fixture(scope="module")
def lora_model():
    """The tiny LLaMA with LoRA on every linear layer, B initialised away from 0 so every gradient is informative."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_base_model(ModelConfig(), "lora"), lora_config(AdapterConfig(dropout=0.0)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    """Three rows: right padding on two of them, a prompt (label -100) on each."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1000, (3, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 31:] = 0
    mask[2, 17:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :6] = -100
    return ids, mask, labels


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in trainable(model).items()}


def test_token_logprobs_equal_naive_values_and_gradients(lora_model, batch):
    """``policy_token_logprobs`` (hidden states, then ``lm_head`` in chunks of 7 positions, so chunks straddle rows)
    against ``token_logprobs`` over the model's full logits: the same per-token values, and the same gradients for
    every LoRA weight from a loss that weighs each token differently."""
    ids, mask, labels = batch
    weights = torch.linspace(0.5, 1.5, ids.shape[1] - 1)
    naive = token_logprobs(*shift_for_causal_lm(lora_model(input_ids=ids, attention_mask=mask).logits, labels))
    naive_grads = grads_of(lora_model, (naive * weights).sum())
    lean = policy_token_logprobs(lora_model, ids, mask, labels, chunk_size=7)
    lean_grads = grads_of(lora_model, (lean * weights).sum())

    assert lean.shape == (3, ids.shape[1] - 1) and lean.dtype == torch.float32
    torch.testing.assert_close(lean, naive, atol=1e-5, rtol=1e-5)
    assert (lean[labels[:, 1:] == -100] == 0).all()
    assert naive_grads.keys() == lean_grads.keys() and len(lean_grads) > 0
    for name in naive_grads:
        # float32 sums in another order (chunks, and however many threads torch uses): agreement to 1e-6 of the
        # gradient's scale. With 2 threads o_proj's lora_B (scale 47) differed by 2.3e-5 at one element.
        scale = naive_grads[name].abs().max().item()
        torch.testing.assert_close(lean_grads[name], naive_grads[name], atol=1e-6 * max(scale, 1.0), rtol=1e-4, msg=name)


def test_sequence_logprobs_equal_naive(lora_model, batch):
    """Summed over each row, the chunked log-probs equal ``sequence_logprobs`` over the full logits; labels default
    to the unmasked input ids; a temperature divides the logits."""
    ids, mask, labels = batch
    with torch.no_grad():
        logits = lora_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(policy_token_logprobs(lora_model, ids, mask, labels, chunk_size=16).sum(-1),
                                   sequence_logprobs(logits, labels), atol=1e-4, rtol=1e-5)
        unmasked = ids.masked_fill(mask == 0, -100)
        torch.testing.assert_close(policy_token_logprobs(lora_model, ids, mask).sum(-1),
                                   sequence_logprobs(logits, unmasked), atol=1e-4, rtol=1e-5)
        hot = policy_token_logprobs(lora_model, ids, mask, labels, temperature=0.7)
        torch.testing.assert_close(hot, token_logprobs(*shift_for_causal_lm(logits / 0.7, labels)), atol=1e-5, rtol=1e-5)


def test_packed_rows_equal_separate_rows(lora_model, batch):
    """Two conversations packed into one row (positions restarting, no mask) score as they do on their own, apart
    from the first token of the second, which packing scores from the end of the first (labelled -100 here, as TRL's
    collator does)."""
    ids, _, labels = batch
    first, second = ids[0, :25], ids[2, :17]
    packed = torch.cat([first, second]).unsqueeze(0)
    positions = torch.cat([torch.arange(25), torch.arange(17)]).unsqueeze(0)
    packed_labels = packed.clone()
    packed_labels[0, 25] = -100
    with torch.no_grad():
        together = policy_token_logprobs(lora_model, packed, None, packed_labels, position_ids=positions)
        alone_1 = policy_token_logprobs(lora_model, first.unsqueeze(0))
        alone_2 = policy_token_logprobs(lora_model, second.unsqueeze(0))
    torch.testing.assert_close(together[0, :24], alone_1[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[0, 25:], alone_2[0], atol=1e-5, rtol=1e-5)


def test_adapter_on_lm_head_is_refused(batch):
    """A LoRA-wrapped ``lm_head`` cannot be scored from its base weight alone: a clear error, not a wrong number."""
    from peft import get_peft_model

    model = get_peft_model(load_base_model(ModelConfig(), "lora"), lora_config(AdapterConfig(target_modules=["lm_head"])))
    with pytest.raises(ValueError, match="lm_head"):
        policy_token_logprobs(model, batch[0])
