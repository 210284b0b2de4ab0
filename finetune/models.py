"""Resolving and loading base models, tokenizers and adapters."""

from __future__ import annotations

import re
from pathlib import Path

from .run_dir import ADAPTER_WEIGHTS
from .tiny import TINY_NAME, tiny_model_dir


def resolve_model(name_or_path: str) -> str:
    """Map a model name to something ``from_pretrained`` accepts: ``tiny`` -> the embedded model's directory,
    a local directory -> itself, anything else -> a hub id (used as is)."""
    if name_or_path == TINY_NAME:
        return str(tiny_model_dir())
    return str(Path(name_or_path)) if Path(name_or_path).exists() else name_or_path


TOKENIZER_MODEL = "tokenizer.model"

LLAMA3_BASE_VOCAB = 128_000
"""How many BPE ranks Meta's Llama 3 tiktoken ``tokenizer.model`` holds; its 256 special tokens follow them."""

LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 246)]
"""Llama 3's special tokens, ids 128000-128255, as Meta's ``llama_models/llama3/tokenizer.py`` names them (the
tiktoken file has only the ranks; Meta's code adds these)."""

_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+=* \d+")


def _bare_tokenizer_model(path: Path) -> str | None:
    """``"tiktoken"`` or ``"sentencepiece"`` when ``path`` is a directory whose only tokenizer file is a
    ``tokenizer.model`` (Meta's downloads for Llama 1/2 and 3), else None (a ``tokenizer.json`` says it all)."""
    if not path.is_dir() or not (path / TOKENIZER_MODEL).is_file():
        return None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        return None
    with open(path / TOKENIZER_MODEL, "rb") as f:
        first_line = f.readline().strip()
    return "tiktoken" if _TIKTOKEN_LINE.fullmatch(first_line) else "sentencepiece"


def _bare_tokenizer_kwargs(path: Path, kind: str) -> dict:
    """What ``AutoTokenizer.from_pretrained`` needs besides the file for a bare ``tokenizer.model``.

    Raises:
        ConfigError: the library that reads such a file is not installed (one line naming it).
    """
    import importlib.util

    from .config import ConfigError

    needs = {"tiktoken": ["tiktoken"], "sentencepiece": ["sentencepiece", "google.protobuf"]}[kind]
    missing = [module for module in needs if importlib.util.find_spec(module.split(".")[0]) is None]
    if missing:
        packages = " ".join("protobuf" if m == "google.protobuf" else m for m in missing)
        raise ConfigError(f"{path / TOKENIZER_MODEL} is a {kind} tokenizer; reading it needs: pip install {packages}")
    if kind == "sentencepiece":
        return {}
    with open(path / TOKENIZER_MODEL, "rb") as f:
        ranks = sum(1 for line in f if line.strip())
    if ranks != LLAMA3_BASE_VOCAB:
        return {}
    return {
        "extra_special_tokens": LLAMA3_SPECIAL_TOKENS,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
    }


def load_tokenizer(name_or_path: str):
    """The tokenizer of a model name, directory or hub id, with a pad token guaranteed.

    A directory holding only a ``tokenizer.model`` (as Meta ships Llama 1/2 and 3) loads too: SentencePiece through
    ``sentencepiece`` + ``protobuf``, Meta's Llama 3 tiktoken file through ``tiktoken``, with Llama 3's 256 special
    tokens added as Meta's own tokenizer adds them. Without the library a :class:`~finetune.config.ConfigError`
    names the package to install.
    """
    from transformers import AutoTokenizer

    resolved = resolve_model(name_or_path)
    kind = _bare_tokenizer_model(Path(resolved))
    kwargs = _bare_tokenizer_kwargs(Path(resolved), kind) if kind else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, **kwargs)
    except OSError as e:
        if Path(resolved).exists():
            raise
        # A mistyped run directory reads as a hub id: say both, or the user hears only about the network.
        raise OSError(f"{name_or_path}: no such local directory, and as a hub model id: {e}") from None
    if tokenizer.pad_token is None:
        # Llama 2/3 ship without one; reuse EOS for padding (padded positions are masked out of every loss).
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


DTYPES = ("bfloat16", "float16", "float32")
"""The dtypes a model is loaded, trained or exported in, by the names config files and ``--dtype`` use (each is the
``torch`` attribute of that name); ``model.dtype`` also takes ``auto``."""


def resolve_dtype(name: str):
    """``auto`` -> bf16 on a CUDA GPU that supports it, else float32 (CPU training in bf16 is slow and lossy)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return getattr(torch, name)


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

    ``method="qlora"`` loads the weights in 4-bit NF4; anything else in ``model_cfg.dtype``. The attention backend
    (``auto`` resolved here), Liger's kernels and, for training, activation checkpointing come from ``model_cfg``
    (``finetune.kernels``, ``finetune.activation_checkpointing``).
    """
    from transformers import AutoModelForCausalLM

    from .kernels import resolve_attn_implementation

    dtype = resolve_dtype(model_cfg.dtype)
    kwargs = dict(dtype=dtype, attn_implementation=resolve_attn_implementation(model_cfg.attn_implementation, dtype))
    if method == "qlora":
        kwargs["quantization_config"] = quantization_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_cfg.name), **kwargs)
    return _prepare(model, model_cfg, for_training)


def _prepare(model, model_cfg, for_training: bool):
    """Liger's kernels when asked and possible; for training, no KV cache and the configured activation
    checkpointing."""
    from .activation_checkpointing import checkpointing_mode, enable_activation_checkpointing
    from .kernels import apply_liger

    apply_liger(model, getattr(model_cfg, "use_liger", False))
    keep_unpacked_4bit_where_cpu_packing_fails(model)
    if for_training:
        model.config.use_cache = False  # the cache is useless in training and breaks packed attention isolation
        enable_activation_checkpointing(model, checkpointing_mode(model_cfg))
    return model


def keep_unpacked_4bit_where_cpu_packing_fails(model) -> int:
    """On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for its CPU kernel at the first forward
    without gradients, and that repacking raises unless the layer's inputs are a multiple of the quantisation block
    (64) and its outputs of 32. Real LLaMA shapes are; the tiny model's MLP (352) is not. Such layers keep the
    portable layout. Returns how many layers were kept."""
    kept = 0
    for module in model.modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        if quant_state is None or not getattr(module, "support_avx512bf16_for_cpu", False):
            continue
        if module.in_features % quant_state.blocksize or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False
            kept += 1
    return kept


def lora_config(adapter_cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    """A PEFT ``LoraConfig`` from :class:`finetune.config.AdapterConfig` (``None`` for full fine-tuning);
    ``task_type`` and ``modules_to_save`` as PEFT takes them (the reward model: ``SEQ_CLS`` and its ``score`` head)."""
    if adapter_cfg.method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=adapter_cfg.r,
        lora_alpha=adapter_cfg.alpha,
        lora_dropout=adapter_cfg.dropout,
        target_modules=list(adapter_cfg.target_modules),
        bias="none",
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


# ---------------------------------------------------------------------------------------------------------------
# One base, many adapters: a run's adapter loaded by name onto a base that is loaded once.


def load_adapter(model, run_dir: str | Path, adapter_name: str = "default", trainable: bool = False):
    """Attach the adapter saved in ``run_dir`` to ``model`` under ``adapter_name``; returns the ``PeftModel``.

    ``model`` is a bare base (it gets wrapped) or a ``PeftModel`` that already holds other adapters on the same base
    (the adapter is added beside them, the base is not copied). ``trainable=False`` freezes the new adapter.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(run_dir), adapter_name=adapter_name, is_trainable=trainable)
    else:
        model = PeftModel.from_pretrained(model, str(run_dir), adapter_name=adapter_name, is_trainable=trainable)
    # The saved config names the base as the user did (``tiny``: ``model_card.record_base_model``). In memory it names
    # the base as loaded, as a new adapter's does: on each save PEFT looks that name up for a config.json, and
    # ``tiny`` would be a hub query (a warning offline) for a repository that is not ours.
    loaded_from = getattr(model.get_base_model().config, "_name_or_path", None)
    if loaded_from:
        model.peft_config[adapter_name].base_model_name_or_path = loaded_from
    return model


def copy_adapter_weights(peft_model, run_dir: str | Path, adapter_name: str = "default") -> int:
    """Overwrite adapter ``adapter_name`` of ``peft_model`` with the LoRA weights saved in ``run_dir``.

    For an adapter of the same shape on a different head, e.g. a reward model's adapter initialised from the SFT
    policy's (the keys of ``LlamaForCausalLM`` and ``LlamaForSequenceClassification`` backbones agree). Returns how
    many tensors were copied; raises ``ValueError`` if any saved tensor has no place in the model.
    """
    from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

    weights = load_peft_weights(str(run_dir), device="cpu")
    # Start from the adapter's own tensors, so parts the saved run lacks (a new scalar head) keep their values.
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    unexpected = [k for k in weights if k not in state]
    if unexpected:
        raise ValueError(f"{run_dir}: adapter tensors with no place in the model: {unexpected[:3]}")
    state.update(weights)
    set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    return len(weights)


def load_sequence_classifier(model_cfg, method: str = "lora", name_or_path: str | None = None, for_training: bool = True):
    """The backbone of ``model_cfg`` with a new scalar head (``num_labels=1``): a reward or value model's base.

    ``name_or_path`` overrides ``model_cfg.name`` (a full-weights run to start from). With ``method="qlora"`` the
    backbone is 4-bit NF4 while the ``score`` head stays in ``model_cfg.dtype``, so it can be trained and saved.
    """
    from transformers import AutoModelForSequenceClassification

    from .kernels import resolve_attn_implementation

    dtype = resolve_dtype(model_cfg.dtype)
    attn_implementation = resolve_attn_implementation(model_cfg.attn_implementation, dtype)
    kwargs = dict(dtype=dtype, attn_implementation=attn_implementation, num_labels=1)
    if method == "qlora":
        quant = quantization_config(dtype)
        quant.llm_int8_skip_modules = ["score"]
        kwargs["quantization_config"] = quant
    # A causal LM checkpoint has no `score` head (it is new) and an `lm_head` the classifier does not use: expected.
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    with suppress_seqcls_warning():
        model = AutoModelForSequenceClassification.from_pretrained(resolve_model(name_or_path or model_cfg.name), **kwargs)
    return _prepare(model, model_cfg, for_training)


def activate_adapter(peft_model, adapter_name: str, trainable: tuple[str, ...] | list[str] = ()) -> None:
    """Make ``adapter_name`` the active role of a base that holds several adapters, without changing which adapters
    train: PEFT's ``set_adapter`` would make the active adapter trainable and freeze every other one, so after it only
    the adapters named in ``trainable`` get ``requires_grad`` back (the same set whichever role is active)."""
    peft_model.set_adapter(adapter_name, inference_mode=True)
    if trainable:
        peft_model.set_requires_grad(list(trainable), True)


def load_scalar_head_adapter(peft_model, run_dir: str | Path, adapter_name: str, trainable: bool = False):
    """Put a reward run's LoRA adapter (``recipes/reward.py``: a sequence-classifier adapter whose saved
    ``modules_to_save`` hold the ``score`` head) on a causal-LM ``PeftModel`` as adapter ``adapter_name``, and return
    its head as a separate ``torch.nn.Linear(hidden, 1, bias=False)``.

    The backbone keys of ``LlamaForSequenceClassification`` and ``LlamaForCausalLM`` agree, so the LoRA tensors go on
    the shared base as they are; the head reads the backbone's last hidden state, as the classifier's ``score`` does.
    ``trainable`` sets ``requires_grad`` on the adapter and the head (a value model starts from the reward model).
    """
    import torch
    from peft import LoraConfig
    from peft.utils import load_peft_weights, set_peft_model_state_dict

    saved = LoraConfig.from_pretrained(str(run_dir))
    peft_model.add_adapter(
        adapter_name,
        LoraConfig(
            r=saved.r,
            lora_alpha=saved.lora_alpha,
            lora_dropout=saved.lora_dropout,
            target_modules=saved.target_modules,
            bias=saved.bias,
            task_type="CAUSAL_LM",
        ),
    )
    weights = load_peft_weights(str(run_dir), device="cpu")
    heads = [k for k in weights if k.endswith("score.weight")]
    if len(heads) != 1:
        raise ValueError(f"{run_dir}: expected one scalar head (score.weight) in the adapter; found {heads or 'none'}")
    head_weight = weights.pop(heads[0])
    if head_weight.shape[0] != 1:
        raise ValueError(f"{run_dir}: the head has {head_weight.shape[0]} outputs; a reward model has 1")
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    if result.unexpected_keys:
        raise ValueError(f"{run_dir}: adapter tensors with no place in the model: {result.unexpected_keys[:3]}")
    head = torch.nn.Linear(head_weight.shape[1], 1, bias=False, dtype=head_weight.dtype)
    with torch.no_grad():
        head.weight.copy_(head_weight)
    head.requires_grad_(trainable)
    peft_model.set_requires_grad(adapter_name, trainable)
    return head


def backbone_hidden_states(peft_model, input_ids, attention_mask):
    """``[B, T, H]`` last hidden states (after the final norm) of a causal LM's backbone with the active adapter:
    what the LM head turns into logits and a scalar head into a score or a value."""
    causal_lm = peft_model.get_base_model()
    return causal_lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def save_adapter(peft_model, adapter_name: str, out_dir: str | Path) -> Path:
    """Save one named adapter of a multi-adapter model at the top of ``out_dir`` (``adapter_config.json`` and
    ``adapter_model.safetensors``), loadable as a run's adapter like any other; PEFT's ``save_pretrained`` would put
    a non-default adapter in a sub-directory named after it."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_dir / ADAPTER_WEIGHTS,
              metadata={"format": "pt"})
    peft_model.peft_config[adapter_name].save_pretrained(str(out_dir))
    return out_dir
