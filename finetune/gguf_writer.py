"""Write a LLaMA causal LM and its byte-level BPE tokenizer as a GGUF file for llama.cpp, in Python.

No llama.cpp build and no external binary: the ``gguf`` package (llama.cpp's own ``gguf-py``) writes the file, and
this module decides what goes in it, following what llama.cpp's ``convert_hf_to_gguf.py`` writes for ``LlamaModel``:

- hyperparameters under ``llama.*``: context length, embedding length, block count, feed-forward length, head count,
  head count KV, RoPE base, dimension count and scaling, RMS-norm epsilon, vocabulary size;
- the tokenizer as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE): every token in the byte alphabet, its type
  (normal, control for special tokens, unused for padding rows), the merges, BOS/EOS/pad ids, the pre-tokenizer
  ``llama-bpe`` (Llama 3's split regex), the chat template, and the stop token as EOS and EOT;
- tensors named as llama.cpp names them (``token_embd``, ``blk.N.attn_q`` ...), with the rows of Q and K permuted
  from Hugging Face's rotate-half order back to the interleaved pairs llama.cpp's RoPE rotates (:func:`unpermute_qk`).

``f32`` keeps every tensor in float32; ``f16`` stores 2-D weights in float16; ``q8_0`` stores them in blocks of 32
int8 values with one float16 scale (8.5 bits per weight). Norms (1-D) and the RoPE frequency factors stay float32.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GGUF_DTYPES = ("f32", "f16", "q8_0")
"""What ``--dtype`` accepts for a GGUF export."""

LLAMA3_PRE_TOKENIZER = "llama-bpe"
"""llama.cpp's name for Llama 3's pre-tokenizer split (the regex of :data:`finetune.tiny.LLAMA3_SPLIT_PATTERN`)."""

# Stripped from the chat template written into the GGUF: transformers uses {% generation %} to find the assistant's
# tokens for training, but llama.cpp's jinja engine does not know the tag. The text rendered is the same without it.
_GENERATION_MARKERS = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")

# HF name (after ``model.layers.N.``) -> llama.cpp name (after ``blk.N.``)
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFExportError(ValueError):
    """A model or tokenizer this writer cannot express as a llama.cpp LLaMA GGUF."""


@dataclass(frozen=True)
class Vocab:
    """The tokenizer as GGUF stores it."""

    tokens: list[str]
    """Every id's token, byte-level spelled (``Ġthe``); special tokens as their text; ``[PAD{id}]`` for unused rows."""
    token_types: list[int]
    """``gguf.TokenType`` per id: NORMAL, CONTROL (special tokens), USER_DEFINED (added, not special), UNUSED."""
    merges: list[str]
    """BPE merges as ``"left right"``, highest priority first."""


def unpermute_qk(weight, n_head: int):
    """Hugging Face's Q/K rows (rotate-half: each head's first half then second half) -> llama.cpp's (pairs).

    ``convert_llama_weights_to_hf.py`` permuted Meta's rows so that RoPE rotates dimension i with i + d/2; llama.cpp
    rotates 2i with 2i+1, so the rows go back: per head, [d/2 pairs, 2] instead of [2, d/2]. ``n_head`` is the number
    of query heads for Q and of key/value heads for K. Works on torch tensors and numpy arrays, weights and biases.

    Args:
        weight: ``[n_head * head_dim, ...]``.
    """
    head_dim = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope(config) -> dict:
    """RoPE settings from a config of either generation: ``rope_parameters`` (transformers 5) or ``rope_scaling``."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None) or {}
    for key, value in legacy.items():
        params.setdefault(key, value)
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray | None:
    """The ``rope_freqs`` tensor llama.cpp uses for Llama 3.1's RoPE scaling (``rope_type: llama3``), else None.

    One divisor per rotary frequency (Meta's ``apply_scaling``): high frequencies are kept, low ones divided by
    ``factor``, and those in between interpolated smoothly.
    """
    rope = _rope(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = _head_dim(config)
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_context = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def check_llama(config) -> None:
    """Raise :class:`GGUFExportError` unless ``config`` is a LLaMA this writer handles."""
    if getattr(config, "model_type", None) != "llama":
        raise GGUFExportError(f"GGUF export writes LLaMA models; this one is {getattr(config, 'model_type', None)!r}")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ("default", "linear", "llama3"):
        raise GGUFExportError(f"GGUF export handles RoPE default, linear and llama3; this model has {rope_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFExportError(f"llama.cpp's LLaMA uses SiLU; this model has hidden_act={config.hidden_act!r}")


def llama_tensors(state_dict: dict, config) -> Iterator[tuple[str, object]]:
    """``(gguf_name, tensor)`` for every weight, renamed and with Q/K rows in llama.cpp's order.

    ``lm_head`` is skipped when tied to the embeddings (llama.cpp then reuses ``token_embd``); rotary buffers are
    skipped (llama.cpp computes them). An unknown tensor is an error rather than silently dropped.
    """
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue
        match = _LAYER.match(name)
        if match:
            block, module, kind = match.groups()
            if module not in _BLOCK_TENSORS:
                raise GGUFExportError(f"no llama.cpp name for tensor {name!r}")
            if module == "self_attn.q_proj":
                tensor = unpermute_qk(tensor, config.num_attention_heads)
            elif module == "self_attn.k_proj":
                tensor = unpermute_qk(tensor, config.num_key_value_heads)
            yield f"blk.{block}.{_BLOCK_TENSORS[module]}.{kind}", tensor
            continue
        module, _, kind = name.rpartition(".")
        if module not in _GLOBAL_TENSORS:
            raise GGUFExportError(f"no llama.cpp name for tensor {name!r}")
        if module == "lm_head" and tied:
            continue
        yield f"{_GLOBAL_TENSORS[module]}.{kind}", tensor


def _pre_tokenizer_name(backend: dict) -> str:
    """``llama-bpe`` when the tokenizer splits text with Llama 3's regex then maps bytes; otherwise an error.

    llama.cpp picks its pre-tokenizer by this name; a wrong one tokenises differently without any error.
    """
    from .tiny import LLAMA3_SPLIT_PATTERN

    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    patterns = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if patterns == [LLAMA3_SPLIT_PATTERN] and len(byte_level) == 1 and not byte_level[0].get("use_regex", True):
        return LLAMA3_PRE_TOKENIZER
    raise GGUFExportError(
        "GGUF export supports byte-level BPE tokenizers with Llama 3's pre-tokenizer (Llama 3 models, the tiny "
        "model); this tokenizer's pre-tokenizer is different, and llama.cpp would split text differently"
    )


def tokenizer_vocab(tokenizer, vocab_size: int) -> tuple[Vocab, str]:
    """The GGUF vocabulary of a byte-level BPE ``PreTrainedTokenizerFast`` and llama.cpp's pre-tokenizer name.

    Rows of the embedding beyond the tokenizer (models pad their vocabulary) become ``[PAD{id}]``, type UNUSED, as
    ``convert_hf_to_gguf.py`` writes them.
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r} "
            f"(SentencePiece vocabularies such as Llama 2's are not supported yet)"
        )
    pre = _pre_tokenizer_name(backend)
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise GGUFExportError(f"the tokenizer has {len(by_id)} tokens but the model's vocabulary only {vocab_size}")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, [int(t) for t in types], merges), pre


def gguf_chat_template(jinja: str) -> str:
    """The template for ``tokenizer.chat_template``: the same text, without transformers' generation markers."""
    return _GENERATION_MARKERS.sub("", jinja).strip()


def _quantize(array: np.ndarray, dtype: str):
    """``(data, raw_dtype)`` for ``GGUFWriter.add_tensor``: 2-D weights in ``dtype``, everything else float32."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim < 2 or dtype == "f32":
        return array, None
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None  # f16, and q8_0's fallback for rows not a multiple of 32 (as llama.cpp)


def write_llama_gguf(
    path: str | Path,
    model,
    tokenizer,
    *,
    dtype: str = "f16",
    chat_template: str | None = None,
    stop_token_ids: list[int] | None = None,
    add_bos_token: bool = True,
    name: str | None = None,
) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, adapters already merged) and ``tokenizer`` to a GGUF file.

    Args:
        dtype: ``f32``, ``f16`` or ``q8_0`` for 2-D weights (norms stay float32).
        chat_template: the jinja chat template (stored without ``{% generation %}`` markers).
        stop_token_ids: the template's end-of-turn tokens, first the one that closes an assistant turn. It becomes
            EOS and EOT, so llama.cpp stops there (Llama 3 Instruct's GGUFs do the same with ``<|eot_id|>``).
        add_bos_token: whether llama.cpp prepends BOS to a prompt (true when the template starts with BOS: llama.cpp
            then drops the template's own copy, and Ollama's templates leave it out).
    """
    import gguf
    import torch

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    config = model.config
    check_llama(config)
    vocab, pre = tokenizer_vocab(tokenizer, config.vocab_size)
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]
    rope = _rope(config)
    head_dim = _head_dim(config)

    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name(name or "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    stops = list(stop_token_ids or [])
    eos = stops[0] if stops else tokenizer.eos_token_id
    if eos is not None:
        writer.add_eos_token_id(eos)
        writer.add_eot_token_id(eos)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(add_bos_token)
    writer.add_add_eos_token(False)
    if chat_template:
        writer.add_chat_template(gguf_chat_template(chat_template))

    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    with torch.no_grad():
        for gguf_name, tensor in llama_tensors(model.state_dict(), config):
            data, raw_dtype = _quantize(tensor.detach().to("cpu", torch.float32).numpy(), dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
