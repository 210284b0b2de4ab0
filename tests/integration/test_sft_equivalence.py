"""SFT invariants on the tiny model: packed equals unpacked, and gradient accumulation equals a big batch."""

import zlib

import pytest
import torch
from loss_oracles import sft_loss
from torch.testing import assert_close
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from finetune.config import ModelConfig
from finetune.models import load_base_model


def test_packed_loss_and_logits_equal_unpacked(tokenizer, rows):
    """Five conversations of different lengths, once right-padded with an attention mask, once concatenated into one
    row with position ids restarting at each conversation and no mask (TRL's padding-free collator). Under SDPA
    the packed conversations must not see each other: identical logits at every real token, identical loss."""
    model = load_base_model(ModelConfig(name="tiny"), "full")
    model.eval()

    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(rows)
    packed_rows = [
        {
            "input_ids": [t for r in rows for t in r["input_ids"]],
            "labels": [t for r in rows for t in r["labels"]],
            "seq_lengths": [len(r["input_ids"]) for r in rows],
        }
    ]
    packed = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(packed_rows)
    assert "attention_mask" not in packed
    assert packed["position_ids"][0, len(rows[0]["input_ids"])] == 0  # positions restart at the second conversation

    with torch.no_grad():
        out_padded = model(**padded)
        out_packed = model(**packed)

    offset = 0
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        torch.testing.assert_close(out_packed.logits[0, offset : offset + n], out_padded.logits[i, :n], atol=1e-5, rtol=1e-4)
        offset += n
    torch.testing.assert_close(out_packed.loss, out_padded.loss, atol=1e-6, rtol=1e-5)


def _gradients_of_one_step(tmp_path, tokenizer, rows, batch_size, accumulation):
    """Run one optimizer step of SFTTrainer and capture the LoRA gradients just before the optimizer applies them."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    from finetune.config import SFTRunConfig, parse_args
    from finetune.models import lora_config
    from finetune.stages.sft import trl_arguments

    cfg = parse_args(
        SFTRunConfig,
        [
            f"--train.per_device_batch_size={batch_size}",
            f"--train.gradient_accumulation_steps={accumulation}",
            "--train.max_steps=1",
            "--train.logging_steps=1",
            "--train.save_steps=1000",
            "--adapter.dropout=0",
            "--data.packing=false",
        ],
    )
    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            for name, p in model.named_parameters():
                if p.grad is not None:
                    captured[name] = p.grad.detach().clone()

    torch.manual_seed(0)
    model = load_base_model(cfg.model, "lora")
    args = trl_arguments(cfg, tmp_path, has_eval=False)
    args.report_to = []
    args.save_strategy = "no"
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows[:4]),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter),
        callbacks=[Capture()],
    )
    # Zero-initialised LoRA B makes A's gradient zero; give B values so every gradient is informative.
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))) * 0.02)
    result = trainer.train()
    return result.training_loss, captured


def test_accumulation_equals_big_batch(tmp_path, tokenizer, rows):
    """Batch 1 x accumulation 4 and batch 4 x accumulation 1 over the same four conversations of different lengths:
    the loss is the mean over all trained tokens of the accumulated batch, so loss and gradients are equal."""
    loss_big, grads_big = _gradients_of_one_step(tmp_path / "big", tokenizer, rows, 4, 1)
    loss_acc, grads_acc = _gradients_of_one_step(tmp_path / "acc", tokenizer, rows, 1, 4)
    assert grads_big and grads_big.keys() == grads_acc.keys()
    assert loss_acc == pytest.approx(loss_big, rel=1e-5)
    for name in grads_big:
        torch.testing.assert_close(grads_acc[name], grads_big[name], atol=1e-6, rtol=1e-4, msg=name)


def test_trl_sft_loss_equals_the_oracle(tmp_path, tokenizer, rows):
    """TRL's ``SFTTrainer.compute_loss`` (what the SFT stage trains with) on four padded suite conversations equals
    the oracle over the full logits: as a plain token mean, and divided by a ``num_items_in_batch`` larger than the
    batch's own count, as transformers passes it under gradient accumulation."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from finetune.config import ModelConfig
    from finetune.models import load_base_model

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=4)
    model = load_base_model(ModelConfig(name="tiny"), "full")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows[:4]), processing_class=tokenizer)
    batch = trainer.data_collator(rows[:4])
    trainer.model.eval()
    with torch.no_grad():
        trl_mean = trainer.compute_loss(trainer.model, batch)
        trl_accumulated = trainer.compute_loss(trainer.model, batch, num_items_in_batch=torch.tensor(40))
        logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours, num_tokens = sft_loss(logits, batch["labels"])
    assert 0 < num_tokens.item() < 40
    assert_close(trl_mean, ours, rtol=1e-5, atol=1e-6)
    assert_close(trl_accumulated, sft_loss(logits, batch["labels"], num_items_in_batch=40)[0], rtol=1e-5, atol=1e-6)
