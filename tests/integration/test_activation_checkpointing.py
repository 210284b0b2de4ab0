"""Selective activation checkpointing: the same gradients as none and full, with no matmul recomputed."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from finetune.activation_checkpointing import checkpointing_mode, enable_activation_checkpointing, selective_context_fn
from finetune.config import ConfigError, ModelConfig, SFTRunConfig, parse_args
from finetune.models import load_base_model, lora_config


def test_config_modes():
    """``activation_checkpointing`` decides when given and sets the older ``gradient_checkpointing`` flag that the
    stages hand to the trainer; left out, the flag decides."""
    assert checkpointing_mode(ModelConfig()) == "none"
    assert checkpointing_mode(ModelConfig(gradient_checkpointing=True)) == "full"
    selective = parse_args(SFTRunConfig, ["--model.activation_checkpointing=selective"]).model
    assert checkpointing_mode(selective) == "selective" and selective.gradient_checkpointing
    none = ModelConfig(gradient_checkpointing=True, activation_checkpointing="none")
    assert checkpointing_mode(none) == "none" and not none.gradient_checkpointing
    with pytest.raises(ConfigError, match="none, full or selective"):
        ModelConfig(activation_checkpointing="some")


class CountOps(TorchDispatchMode):
    """Counts the aten ops run inside the block, by name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def one_step(mode: str, lora: bool):
    """Loss, gradients and the ops run by the backward of one step on the tiny model with ``mode``."""
    from peft import get_peft_model

    from finetune.config import AdapterConfig

    torch.manual_seed(0)
    model = load_base_model(ModelConfig(activation_checkpointing=mode), "lora" if lora else "full")
    if lora:
        model = get_peft_model(model, lora_config(AdapterConfig(dropout=0.1)))
        with torch.no_grad():  # B = 0 at init would make A's gradient 0
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    model.train()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (2, 48), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    torch.manual_seed(2)  # the same dropout masks in every mode
    loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    with CountOps() as ops:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, ops.counts


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora-dropout"])
def test_selective_and_full_give_the_unchecked_gradients(lora):
    """One step on the tiny LLaMA (full weights; LoRA with dropout 0.1, whose masks the recompute must replay):
    loss and every gradient agree across none / full / selective."""
    loss, grads, _ = one_step("none", lora)
    assert grads
    for mode in ("full", "selective"):
        other_loss, other_grads, _ = one_step(mode, lora)
        torch.testing.assert_close(other_loss, loss, atol=0, rtol=0)
        assert other_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(other_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=f"{mode}: {name}")


def test_selective_keeps_matmuls_and_recomputes_the_cheap_ops():
    """What the backward runs: full checkpointing re-runs every decoder-layer matmul and the attention kernel;
    selective re-runs none of them (the same ``mm`` count as no checkpointing) but does recompute RMSNorm's rsqrt and
    the SiLU, which no checkpointing keeps."""
    _, _, none = one_step("none", lora=False)
    _, _, full = one_step("full", lora=False)
    _, _, selective = one_step("selective", lora=False)
    assert selective["mm"] == none["mm"] < full["mm"]
    attention = [k for k in full if k.startswith("_scaled_dot_product") and not k.endswith("backward")]
    assert attention and all(k not in selective for k in attention)
    for cheap in ("rsqrt", "silu"):
        assert none.get(cheap, 0) == 0 and selective[cheap] > 0 and full[cheap] > 0


def test_selective_survives_the_trainer_turning_checkpointing_on(tmp_path):
    """The stages hand ``gradient_checkpointing=True`` to TRL, whose ``Trainer`` (and PEFT) call the model's enable
    method again; each decoder layer must still checkpoint with the selective policy."""
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from finetune.config import AdapterConfig

    cfg = ModelConfig(activation_checkpointing="selective")
    model = load_base_model(cfg, "lora")
    args = TRLSFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=cfg.gradient_checkpointing,
                        report_to=[], max_steps=1)
    trainer = SFTTrainer(model=model, args=args, peft_config=lora_config(AdapterConfig()),
                         train_dataset=Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}]))
    layers = trainer.model.get_base_model().model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    assert all(layer._gradient_checkpointing_func.keywords.get("context_fn") is selective_context_fn for layer in layers)


def test_enable_rejects_unknown_mode():
    with pytest.raises(ValueError, match="selective"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2), "partial")
