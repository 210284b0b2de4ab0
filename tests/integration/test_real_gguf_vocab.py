"""GGUF vocabularies of real tokenizers, read back: llama.cpp's own reference vocabularies and tokenisations.

Byte-level BPE (Llama 3's ``tokenizer.json``, GPT-2's vocabulary as transformers builds it from llama.cpp's file):
our GGUF writer (with a one-layer LLaMA of that vocabulary size) writes the tokens, types and merges of llama.cpp's
own reference file, and transformers, loading our file with ``gguf_file=``, tokenises llama.cpp's reference texts
(``.inp``) into exactly the ids of ``.out``. SentencePiece (Mistral v0.1's ``tokenizer.model`` alone): the pieces,
scores and types of the file itself, and the read-back tokenises as sentencepiece does. Llama 2's reference is not
used here: transformers needs a minute to rebuild its merges from llama.cpp's file, and its reader differs from
llama.cpp on 15 of the 46 texts (those starting with a space). That llama.cpp itself agrees with all of them is
``benchmarks/gguf_llamacpp_parity.py``, run by ``tests/integration/test_real_llamacpp.py`` where llama-cpp-python is installed.
"""

import gguf
import pytest
import torch
from factories import bare_copy, reference_cases

from finetune.gguf_writer import write_llama_gguf
from finetune.models import load_tokenizer

NAME = "vocab.gguf"


def vocab_model(vocab_size: int):
    """A one-layer LLaMA with a real vocabulary's size: the writer needs a model, these tests only its vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def write_vocab(directory, tokenizer, sentencepiece_model=None, add_bos_token=False):
    directory.mkdir(exist_ok=True)
    return write_llama_gguf(directory / NAME, vocab_model(len(tokenizer)), tokenizer, dtype="f16",
                            add_bos_token=add_bos_token, sentencepiece_model=sentencepiece_model)


SCALARS = {gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1", gguf.GGUFValueType.UINT16: "<u2",
           gguf.GGUFValueType.INT16: "<i2", gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
           gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.BOOL: "<u1", gguf.GGUFValueType.UINT64: "<u8",
           gguf.GGUFValueType.INT64: "<i8", gguf.GGUFValueType.FLOAT64: "<f8"}


def fields(path) -> dict:
    """The ``tokenizer.*`` key-values of a GGUF file, as ``GGUFReader``'s ``contents()`` gives them. Read here with
    ``struct`` because ``GGUFReader`` builds a numpy view per array item: 20 s for a 128k-token vocabulary."""
    import struct

    import numpy as np

    data = memoryview(open(path, "rb").read())
    at = 0

    def take(fmt):
        nonlocal at
        values = struct.unpack_from(fmt, data, at)
        at += struct.calcsize(fmt)
        return values[0]

    def take_offset(size):
        nonlocal at
        at += size
        return at - size

    def text():
        size = take("<Q")
        start = take_offset(size)
        return bytes(data[start:start + size]).decode("utf-8")

    def value(kind):
        if kind == gguf.GGUFValueType.STRING:
            return text()
        if kind != gguf.GGUFValueType.ARRAY:
            dtype = np.dtype(SCALARS[kind])
            return np.frombuffer(data, dtype, 1, take_offset(dtype.itemsize)).tolist()[0]
        item, count = take("<I"), take("<Q")
        if item in (gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY):
            return [value(item) for _ in range(count)]
        dtype = np.dtype(SCALARS[item])
        return np.frombuffer(data, dtype, count, take_offset(dtype.itemsize * count)).tolist()

    assert bytes(data[:4]) == b"GGUF"
    at = 4
    _version, _tensors, count = take("<I"), take("<Q"), take("<Q")
    found = {}
    for _ in range(count):
        name = text()
        found[name] = value(take("<I"))
    return {name: contents for name, contents in found.items() if name.startswith("tokenizer.")}


def reference_tokenizer(real_artifacts, name: str):
    """The tokenizer transformers builds from llama.cpp's ``ggml-vocab-NAME.gguf``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_artifacts / "llama.cpp", gguf_file=f"ggml-vocab-{name}.gguf")


def read_back(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, gguf_file=NAME)


def assert_tokenises_like_llama_cpp(tokenizer, real_artifacts, name, known=()):
    """The read-back gives ``.out``'s ids for every reference text except the ``known`` ones."""
    cases = reference_cases(real_artifacts, name)
    got = [tokenizer.encode(text, add_special_tokens=False) for text, _ in cases]
    assert [text for (text, ids), mine in zip(cases, got, strict=True) if mine != ids] == list(known)


def test_sentencepiece_scores_come_from_the_tokenizer_model(real_artifacts, tmp_path):
    from sentencepiece import SentencePieceProcessor

    directory = bare_copy(real_artifacts / "spm" / "tokenizer.model", tmp_path)
    processor = SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tokenizer = load_tokenizer(str(directory))
    ours = fields(write_vocab(tmp_path / "ours", tokenizer, sentencepiece_model=directory / "tokenizer.model"))
    size = processor.vocab_size()
    assert ours["tokenizer.ggml.tokens"] == [processor.IdToPiece(i) for i in range(size)]
    assert ours["tokenizer.ggml.scores"] == pytest.approx([processor.GetScore(i) for i in range(size)])
    expected_types = [
        gguf.TokenType.UNKNOWN if processor.IsUnknown(i) else gguf.TokenType.CONTROL if processor.IsControl(i)
        else gguf.TokenType.BYTE if processor.IsByte(i) else gguf.TokenType.NORMAL
        for i in range(size)
    ]
    assert ours["tokenizer.ggml.token_type"] == expected_types
    assert (ours["tokenizer.ggml.model"], ours["tokenizer.ggml.pre"]) == ("llama", "default")
    assert ours["tokenizer.ggml.token_type"].count(gguf.TokenType.BYTE) == 256
    assert [ours[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown")] == [1, 2, 0]
    assert "tokenizer.ggml.add_space_prefix" not in ours  # llama.cpp's default for SentencePiece: a leading ▁
    # transformers' GGUF reader gives SentencePiece a ▁ only before the first word (prepend_scheme "first"), so a
    # text starting with whitespace differs from sentencepiece, as it does with llama.cpp's own Llama 2 file;
    # llama.cpp itself tokenises those too as sentencepiece does (benchmarks/gguf_llamacpp_parity.py)
    texts = [text for text, _ in reference_cases(real_artifacts, "llama-spm") if text and not text[0].isspace()]
    loaded = read_back(tmp_path / "ours")
    assert len(texts) == 23
    assert [t for t in texts if loaded.encode(t, add_special_tokens=False) != processor.encode(t)] == []


def test_llama3_byte_level_vocabulary(real_artifacts, tmp_path):
    source = load_tokenizer(str(real_artifacts / "llama3"))  # Llama 3's tokenizer.json
    ours = fields(write_vocab(tmp_path / "ours", source))
    reference = fields(real_artifacts / "llama.cpp" / "ggml-vocab-llama-bpe.gguf")
    for key in ("model", "pre", "tokens", "token_type", "merges"):
        assert ours[f"tokenizer.ggml.{key}"] == reference[f"tokenizer.ggml.{key}"], key
    # transformers' GGUF reader builds BPE without Llama 3's ignore_merges (whole words looked up first), which
    # llama.cpp applies for llama-bpe: one reference text then splits differently in transformers; llama.cpp
    # itself gives all 46 (benchmarks/gguf_llamacpp_parity.py)
    assert_tokenises_like_llama_cpp(read_back(tmp_path / "ours"), real_artifacts, "llama-bpe", known=["Cửa Việt"])


def test_gpt2_byte_level_vocabulary(real_artifacts, tmp_path):
    source = reference_tokenizer(real_artifacts, "gpt-2")
    ours = fields(write_vocab(tmp_path / "ours", source))
    reference = fields(real_artifacts / "llama.cpp" / "ggml-vocab-gpt-2.gguf")
    for key in ("model", "pre", "tokens", "merges", "bos_token_id", "eos_token_id"):
        assert ours[f"tokenizer.ggml.{key}"] == reference[f"tokenizer.ggml.{key}"], key
    assert_tokenises_like_llama_cpp(read_back(tmp_path / "ours"), real_artifacts, "gpt-2")
