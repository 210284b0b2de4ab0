"""Resolving and loading base models, tokenizers and adapters."""

from __future__ import annotations

from pathlib import Path

from .tiny import TINY_NAME, tiny_model_dir


def resolve_model(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts: ``tiny`` -> the embedded model's directory,
    a local directory -> itself, anything else -> a hub id (used as is)."""
    if name_or_path == TINY_NAME:
        return str(tiny_model_dir())
    return str(Path(name_or_path)) if Path(name_or_path).exists() else name_or_path


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model name, directory or hub id, with a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        # Llama 2/3 ship without one; reuse EOS for padding (padded positions are masked out of every loss).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(name: str):
    """``auto`` -> bf16 on a CUDA GPU that supports it, else float32 (CPU training in bf16 is slow and lossy)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise ValueError(f"model.dtype must be auto, bfloat16, float16 or float32; got {name!r}") from None


def quantization_config(dtype):
    """QLoRA's base: 4-bit NF4 with double quantisation, computing in ``dtype`` (Dettmers et al. 2023)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_base_model(model_cfg, method: str = "lora", for_training: bool = True):
    """Load the base causal LM named by ``model_cfg`` (see :class:`finetune.config.ModelConfig`).

    ``method="qlora"`` loads the weights in 4-bit NF4; anything else in ``model_cfg.dtype``.
    """
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_cfg.dtype)
    kwargs = dict(dtype=dtype, attn_implementation=model_cfg.attn_implementation)
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_cfg.name), **kwargs)
    if for_training:
        model.config.use_cache = False  # the cache is useless in training and breaks packed attention isolation
    return model


def lora_config(adapter_cfg):
    """A PEFT ``LoraConfig`` from :class:`finetune.config.AdapterConfig` (``None`` for full fine-tuning)."""
    if adapter_cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=list(adapter_cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
