"""eval_loss: the chunked log-prob path equals the plain cross-entropy of the model's logits."""

import torch

from finetune.evaluate import eval_loss


def _rows(generator: torch.Generator, vocab: int) -> list[dict]:
    rows = []
    for length, prompt in ((9, 3), (5, 2), (12, 7)):  # different lengths, so the collator pads
        ids = torch.randint(0, vocab, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def test_eval_loss_equals_token_mean_cross_entropy():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    rows = _rows(torch.Generator().manual_seed(1), 97)
    total, count = 0.0, 0
    for row in rows:  # one row at a time: no padding at all
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
        count += int((labels != -100).sum())
    # Batches of 2 mix lengths: padding and the per-batch split must not change the token mean.
    assert abs(eval_loss(model, rows, pad_token_id=0, batch_size=2) - total / count) < 1e-5


def test_eval_loss_with_an_adapter_on_lm_head_scores_through_the_head():
    # The chunked path reads lm_head's weight alone; a LoRA-wrapped head must be scored by the module itself.
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0))
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["lm_head", "q_proj"], init_lora_weights=False))
    rows = _rows(torch.Generator().manual_seed(1), 97)
    total, count = 0.0, 0
    for row in rows:
        logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(row["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum", ignore_index=-100).item()
        count += int((labels != -100).sum())
    assert abs(eval_loss(model, rows, pad_token_id=0, batch_size=2) - total / count) < 1e-5
