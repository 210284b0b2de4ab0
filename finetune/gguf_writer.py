"""Write a LLaMA causal LM and its tokenizer as a GGUF file for llama.cpp, in Python.

No llama.cpp build and no external binary: the ``gguf`` package (llama.cpp's own ``gguf-py``) writes the file, and
this module decides what goes in it, following what llama.cpp's ``convert_hf_to_gguf.py`` writes for ``LlamaModel``:

- hyperparameters under ``llama.*``: context length, embedding length, block count, feed-forward length, head count,
  head count KV, RoPE base, dimension count and scaling, RMS-norm epsilon, vocabulary size;
- the tokenizer, either as ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE: every token in the byte alphabet, its
  type, the merges and the pre-tokenizer llama.cpp splits text with, ``llama-bpe``, ``gpt-2`` or ``smollm``) or as
  ``"llama"`` (SentencePiece BPE, Llama 1/2 and Mistral: pieces, scores, types with ``<0xNN>`` byte-fallback pieces
  as BYTE); then BOS/EOS/pad/unknown ids, add-BOS/EOS, the chat template, and the stop token as EOS and EOT;
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
    """Every id's token: byte-level spelled (``Ġthe``) for ``gpt2``, SentencePiece pieces (``▁the``, ``<0x0A>``) for
    ``llama``; special tokens as their text; ``[PAD{id}]`` for unused rows."""
    token_types: list[int]
    """``gguf.TokenType`` per id: NORMAL, CONTROL (special tokens), USER_DEFINED (added, not special), UNUSED, and for
    SentencePiece also UNKNOWN and BYTE (the ``<0xNN>`` fallback pieces)."""
    merges: list[str]
    """BPE merges as ``"left right"``, highest priority first. llama.cpp's SentencePiece tokenizer ignores them (it
    merges by score); they are written for it too, as ``convert_hf_to_gguf.py`` does for a Hugging Face Llama
    tokenizer, so that readers such as transformers need not rebuild them from the scores (a minute for 32,000)."""
    model: str = "gpt2"
    """``tokenizer.ggml.model``: ``gpt2`` (byte-level BPE) or ``llama`` (SentencePiece)."""
    pre: str = LLAMA3_PRE_TOKENIZER
    """``tokenizer.ggml.pre``: llama.cpp's name for the split before BPE (``default`` for SentencePiece)."""
    scores: list[float] | None = None
    """SentencePiece only: a score per id; llama.cpp merges the adjacent pair whose joined piece scores highest."""
    add_space_prefix: bool = True
    """SentencePiece only: whether a text gets a ``▁`` in front (SentencePiece's ``add_dummy_prefix``)."""


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


def _steps(component: dict | None) -> list[dict]:
    """A tokenizer.json normaliser or pre-tokenizer as its list of steps (a ``Sequence`` unrolled, None empty)."""
    if not component:
        return []
    if component.get("type") == "Sequence":
        return list(component.get("pretokenizers") or component.get("normalizers") or [])
    return [component]


def _byte_level_pre_tokenizer(backend: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's split, or None when llama.cpp knows no such split.

    llama.cpp picks its pre-tokenizer by this name (``llama-vocab.cpp``); a wrong one tokenises differently without
    any error. Recognised from the tokenizer's own steps rather than from a hash of one vocabulary's ids (as
    ``convert_hf_to_gguf.py`` does), so a vocabulary we trained ourselves with a known split is recognised too:

    - ``llama-bpe``: Llama 3's regex, then bytes (Llama 3, the tiny model);
    - ``gpt-2``: GPT-2's regex inside ``ByteLevel`` (GPT-2, SmolLM2 as transformers rebuilds it from a GGUF);
    - ``smollm``: single digits split off first, then GPT-2's regex (SmolLM/SmolLM2's ``tokenizer.json``).
    """
    from .tiny import LLAMA3_SPLIT_PATTERN

    if _steps(backend.get("normalizer")):
        return None  # llama.cpp applies no normaliser to a byte-level vocabulary
    steps = _steps(backend.get("pre_tokenizer"))
    kinds = [step.get("type") for step in steps]
    if not kinds or kinds[-1] != "ByteLevel" or steps[-1].get("add_prefix_space", False):
        return None
    gpt2_regex = steps[-1].get("use_regex", True)
    if kinds == ["Split", "ByteLevel"] and not gpt2_regex:
        split = steps[0]
        if split.get("pattern", {}).get("Regex") == LLAMA3_SPLIT_PATTERN and not split.get("invert", False):
            return LLAMA3_PRE_TOKENIZER
    if kinds == ["ByteLevel"] and gpt2_regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and gpt2_regex and steps[0].get("individual_digits"):
        return "smollm"
    return None


def _is_sentencepiece_bpe(backend: dict) -> bool:
    """Whether this is a LLaMA-style SentencePiece BPE vocabulary as transformers holds it (Llama 1/2, Mistral v0.1,
    Vicuna): BPE over ``▁``-for-space pieces with ``<0xNN>`` byte fallback, spaces marked by ``Metaspace`` or by a
    normaliser that replaces them (the older ``tokenizer.json`` form)."""
    model = backend.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    metaspace = any(step.get("type") == "Metaspace" for step in _steps(backend.get("pre_tokenizer")))
    replaces_spaces = any(
        step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " and step.get("content") == "▁"
        for step in _steps(backend.get("normalizer"))
    )
    return metaspace or replaces_spaces


def _adds_space_prefix(backend: dict) -> bool:
    """SentencePiece's ``add_dummy_prefix``: whether a text gets a ``▁`` in front (llama.cpp's ``add_space_prefix``)."""
    for step in _steps(backend.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    return any(step.get("type") == "Prepend" and step.get("prepend") == "▁" for step in _steps(backend.get("normalizer")))


def gguf_tokenizer_kind(tokenizer) -> tuple[str, str]:
    """``(tokenizer.ggml.model, tokenizer.ggml.pre)`` for a transformers fast tokenizer, checked before any weight is
    loaded: ``("llama", "default")`` for SentencePiece BPE, ``("gpt2", name)`` for byte-level BPE with a split
    llama.cpp knows. Anything else raises :class:`GGUFExportError` in one line saying what is supported."""
    backend_tokenizer = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise GGUFExportError(f"GGUF export needs a fast (tokenizers) tokenizer; this one is {type(tokenizer).__name__}")
    backend = json.loads(backend_tokenizer.to_str())
    if _is_sentencepiece_bpe(backend):
        return "llama", "default"
    model_type = (backend.get("model") or {}).get("type")
    if model_type == "BPE":
        pre = _byte_level_pre_tokenizer(backend)
        if pre is not None:
            return "gpt2", pre
        raise GGUFExportError(
            "GGUF export writes byte-level BPE vocabularies whose split llama.cpp knows (Llama 3's llama-bpe, "
            "GPT-2's gpt-2, SmolLM's smollm) and SentencePiece BPE (Llama 1/2, Mistral); this tokenizer's "
            "normaliser or pre-tokenizer is none of them, and llama.cpp would split text differently"
        )
    raise GGUFExportError(
        f"GGUF export writes BPE vocabularies (byte-level like Llama 3, or SentencePiece BPE like Llama 2); this "
        f"tokenizer's model is {model_type!r}"
    )


def _merge_ranks(merges: list) -> dict[str, int]:
    """Each token a merge makes, with the rank of the first (highest-priority) merge that makes it."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def _sentencepiece_pieces(path: Path, tokens: list[str]) -> list[tuple[float, int]] | None:
    """``(score, gguf token type)`` per piece of a SentencePiece ``tokenizer.model``, or None if its pieces are not
    the tokenizer's (another model's file) or sentencepiece cannot read it (Llama 3's tiktoken file)."""
    import gguf

    try:
        from sentencepiece import SentencePieceProcessor

        processor = SentencePieceProcessor(model_file=str(path))
    except (ImportError, OSError, RuntimeError):
        return None
    size = processor.vocab_size()
    if size > len(tokens) or any(processor.IdToPiece(i) != tokens[i] for i in range(size)):
        return None
    pieces = []
    for i in range(size):  # the types convert_hf_to_gguf.py gives (user-defined pieces stay NORMAL there too)
        if processor.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif processor.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif processor.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif processor.IsByte(i):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        pieces.append((float(processor.GetScore(i)), int(kind)))
    return pieces


def tokenizer_vocab(tokenizer, vocab_size: int, sentencepiece_model: str | Path | None = None) -> Vocab:
    """The GGUF vocabulary of a transformers fast tokenizer (see :func:`gguf_tokenizer_kind` for which).

    Byte-level BPE (``gpt2``): tokens as spelled in the byte alphabet, the merges, no scores. SentencePiece BPE
    (``llama``): the pieces, the merges, a score per piece and ``<0xNN>`` pieces as BYTE; llama.cpp's SentencePiece tokenizer
    merges the adjacent pair whose joined piece scores highest, so the scores must rank pieces as the merges do.
    They come from ``sentencepiece_model`` (the model's ``tokenizer.model``) when its pieces are this tokenizer's,
    exactly as ``convert_hf_to_gguf.py`` writes them; else from the merges: a piece scores minus the rank of the
    first merge that makes it (which gives the same tokens), pieces no merge makes score below all of them.
    Special added tokens are CONTROL, other added tokens USER_DEFINED (score -1000, as llama.cpp writes them); rows
    of the embedding beyond the tokenizer (models pad their vocabulary) become ``[PAD{id}]``, type UNUSED.
    """
    import gguf

    model_name, pre = gguf_tokenizer_kind(tokenizer)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in (backend.get("model") or {}).get("merges", [])]
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id, default=-1) >= vocab_size:
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
    types = [int(t) for t in types]
    if model_name == "gpt2":
        return Vocab(tokens, types, merges, model=model_name, pre=pre)

    byte_piece = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    unknown = tokenizer.unk_token_id
    from_file = _sentencepiece_pieces(Path(sentencepiece_model), tokens) if sentencepiece_model else None
    ranks = _merge_ranks(merges)
    scores = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if from_file is not None and index < len(from_file) and kind != gguf.TokenType.USER_DEFINED:
            score, types[index] = from_file[index]
        elif kind == gguf.TokenType.UNUSED:
            score = -10000.0
        elif kind == gguf.TokenType.USER_DEFINED:
            score = -1000.0
        elif index == unknown:
            score, types[index] = 0.0, int(gguf.TokenType.UNKNOWN)
        elif kind == gguf.TokenType.CONTROL:
            score = 0.0
        elif byte_piece.fullmatch(token):
            score, types[index] = 0.0, int(gguf.TokenType.BYTE)
        else:
            score = -float(ranks.get(token, len(merges) + index))
        scores.append(score)
    return Vocab(tokens, types, merges, model=model_name, pre=pre, scores=scores,
                 add_space_prefix=_adds_space_prefix(backend))


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
    sentencepiece_model: str | Path | None = None,
) -> Path:
    """Write ``model`` (a ``LlamaForCausalLM``, adapters already merged) and ``tokenizer`` to a GGUF file.

    Args:
        dtype: ``f32``, ``f16`` or ``q8_0`` for 2-D weights (norms stay float32).
        chat_template: the jinja chat template (stored without ``{% generation %}`` markers).
        stop_token_ids: the template's end-of-turn tokens, first the one that closes an assistant turn. It becomes
            EOS and EOT, so llama.cpp stops there (Llama 3 Instruct's GGUFs do the same with ``<|eot_id|>``).
        add_bos_token: whether llama.cpp prepends BOS to a prompt (true when the template starts with BOS: llama.cpp
            then drops the template's own copy, and Ollama's templates leave it out).
        sentencepiece_model: a SentencePiece ``tokenizer.model`` to take the piece scores from (see
            :func:`tokenizer_vocab`).
    """
    import gguf
    import torch

    if dtype not in GGUF_DTYPES:
        raise GGUFExportError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}; got {dtype!r}")
    config = model.config
    check_llama(config)
    vocab = tokenizer_vocab(tokenizer, config.vocab_size, sentencepiece_model)
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

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.model == "llama" and not vocab.add_space_prefix:
        writer.add_add_space_prefix(False)
    if tokenizer.unk_token_id is not None and vocab.model == "llama":
        writer.add_unk_token_id(tokenizer.unk_token_id)
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
    from tqdm.auto import tqdm

    with torch.no_grad():
        # a count, not a bar: llama_tensors renames, skips and adds tensors; gguf's write bar below has the total
        for gguf_name, tensor in tqdm(llama_tensors(model.state_dict(), config), desc=f"GGUF {dtype}: converting",
                                      unit="tensor", leave=False, dynamic_ncols=True):
            data, raw_dtype = _quantize(tensor.detach().to("cpu", torch.float32).numpy(), dtype)
            writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)  # gguf's own bar, in bytes written
    writer.close()
    return Path(path)
