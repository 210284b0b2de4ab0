"""GGUF export: read back with transformers' GGUF loader and gguf's reader, compared with the merged model.

transformers' loader undoes llama.cpp's Q/K row order when it reads a LLaMA GGUF, so logits that match here show
that the tensors were written in llama.cpp's layout (a file written without the permutation does not match: tested).
Tolerances: f32 is the same arithmetic (max abs logit difference < 1e-4); f16 and q8_0 are stated relative to the
largest logit, with top-1 agreement. Measured figures are in docs/export.md.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from factories import (  # noqa: E402
    CONVERSATION,
    PROMPTS,
    logits_of,
    make_run_dir,
    max_abs_diff,
)

from finetune.export import GGUF_FILE, METADATA_FILE, export  # noqa: E402
from finetune.gguf_writer import (  # noqa: E402
    GGUFExportError,
    gguf_chat_template,
    gguf_tokenizer_kind,
    llama3_rope_factors,
    tokenizer_vocab,
    unpermute_qk,
    write_llama_gguf,
)
from finetune.models import load_tokenizer  # noqa: E402
from finetune.templates import get_template, stop_token_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# Relative to the largest |logit| on the prompts, and the fraction of positions whose argmax must agree.
TOLERANCE = {"f32": (1e-5, 1.0), "f16": (2e-3, 0.98), "q8_0": (0.05, 0.9)}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "sft", seed=3)


@pytest.fixture(scope="module")
def merged(run_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = export(run_dir, "merged", tmp_path_factory.mktemp("merged") / "merged", dtype="float32")
    return AutoModelForCausalLM.from_pretrained(out).eval()


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {dtype: export(run_dir, "gguf", root / dtype, dtype=dtype) for dtype in TOLERANCE}


def load_gguf_model(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32).eval()


def read_fields(path) -> dict:
    """Every metadata key of a GGUF file with its value (strings decoded, arrays as lists)."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, reader


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_gguf_logits_match_the_merged_model(exports, merged, tokenizer, dtype):
    model = load_gguf_model(exports[dtype])
    expected, got = logits_of(merged, tokenizer), logits_of(model, tokenizer)
    scale = max(x.abs().max().item() for x in expected)
    relative, agreement = TOLERANCE[dtype]
    diff = max_abs_diff(got, expected)
    assert diff / scale <= relative, f"{dtype}: max abs diff {diff:.3g} at logit scale {scale:.3g}"
    top1 = torch.cat([(x.argmax(-1) == y.argmax(-1)).float() for x, y in zip(got, expected, strict=True)])
    assert top1.mean().item() >= agreement


def test_without_the_qk_permutation_the_logits_differ(merged, tokenizer, tmp_path, monkeypatch):
    """The test above would catch a writer that forgot llama.cpp's Q/K row order."""
    import finetune.gguf_writer as writer

    monkeypatch.setattr(writer, "unpermute_qk", lambda weight, n_head: weight)
    write_llama_gguf(tmp_path / GGUF_FILE, merged, tokenizer, dtype="f32")
    assert max_abs_diff(logits_of(load_gguf_model(tmp_path), tokenizer), logits_of(merged, tokenizer)) > 0.1


def _rope_half(x, cos, sin):
    """Hugging Face: dimension i rotates with i + d/2."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * torch.cat([cos, cos], -1) + rotated * torch.cat([sin, sin], -1)


def _rope_pairs(x, cos, sin):
    """llama.cpp (ggml_rope, normal mode): dimension 2i rotates with 2i+1."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_unpermuted_rows_under_llama_cpp_rope_equal_hf_rope():
    """For Q (4 heads) and K (2 KV heads): pairs-RoPE of the permuted projection = permuted half-RoPE of HF's."""
    torch.manual_seed(0)
    head_dim, hidden, position = 8, 16, 5
    freqs = position / 10000 ** (torch.arange(0, head_dim, 2) / head_dim)
    cos, sin = freqs.cos(), freqs.sin()
    x = torch.randn(hidden)
    for n_head in (4, 2):
        weight = torch.randn(n_head * head_dim, hidden)
        hf = _rope_half((weight @ x).view(n_head, head_dim), cos, sin).reshape(-1)
        cpp = _rope_pairs((unpermute_qk(weight, n_head) @ x).view(n_head, head_dim), cos, sin).reshape(-1)
        torch.testing.assert_close(cpp, unpermute_qk(hf, n_head))
        # attention scores are unchanged: q.k per head is the same in either order
        torch.testing.assert_close((cpp.view(n_head, -1) ** 2).sum(-1), (hf.view(n_head, -1) ** 2).sum(-1))


def test_gguf_metadata(exports, merged, tokenizer):
    fields, reader = read_fields(exports["q8_0"] / GGUF_FILE)
    config = merged.config
    expected = {
        "general.architecture": "llama",
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 10000.0,
        "llama.rope.dimension_count": 32,
        "llama.vocab_size": 1024,
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": tokenizer.convert_tokens_to_ids("<|begin_of_text|>"),
        "tokenizer.ggml.eos_token_id": tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        "tokenizer.ggml.eot_token_id": tokenizer.convert_tokens_to_ids("<|eot_id|>"),
        "tokenizer.ggml.padding_token_id": tokenizer.convert_tokens_to_ids("<|pad|>"),
        "tokenizer.ggml.add_bos_token": True,
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 1024
    for token_id, token in tokenizer.added_tokens_decoder.items():
        assert tokens[token_id] == token.content and types[token_id] == gguf.TokenType.CONTROL
    assert tokens[tokenizer.convert_tokens_to_ids("Ġthe")] == "Ġthe"
    assert types[tokenizer.convert_tokens_to_ids("Ġthe")] == gguf.TokenType.NORMAL
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    assert fields["tokenizer.ggml.merges"] == [" ".join(m) for m in backend["model"]["merges"]]
    template = fields["tokenizer.chat_template"]
    assert "{%- generation" not in template and template == gguf_chat_template(get_template("llama3").jinja)

    tensors = {t.name: t for t in reader.tensors}
    parts = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "attn_norm", "ffn_norm")
    expected_names = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(4) for part in parts
    }
    assert set(tensors) == expected_names
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(tensors["blk.0.attn_k.weight"].shape) == [128, 64]  # ggml order: [columns, rows]
    assert list(tensors["blk.0.ffn_down.weight"].shape) == [352, 128]


def test_gguf_tokenizer_encodes_conversations_like_ours(exports, tokenizer):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(exports["f32"], gguf_file=GGUF_FILE)
    template = get_template("llama3", tokenizer)
    for messages, prompt in ((CONVERSATION, False), (CONVERSATION[:-1], True)):
        text = template.text(messages, add_generation_prompt=prompt)
        ours = tokenizer.encode(text, add_special_tokens=False)
        assert loaded.encode(text, add_special_tokens=False) == ours
        # add_bos_token: the file's tokenizer puts BOS in front itself, as llama.cpp does
        assert loaded.encode(text.removeprefix("<|begin_of_text|>")) == ours
        assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
    for prompt in PROMPTS:
        assert loaded.encode(prompt, add_special_tokens=False) == tokenizer.encode(prompt, add_special_tokens=False)
    assert loaded.eos_token == "<|eot_id|>" and loaded.pad_token == "<|pad|>"


def test_vocab_is_safe_under_llama_cpp_ignore_merges(tokenizer):
    """llama.cpp's llama-bpe pre-tokenizer looks a whole word up in the vocabulary before applying merges (Llama 3's
    tokenizer.json says ignore_merges). That gives the same ids as our merges-only BPE only if every token is what
    the merges make of its own text; it is, for every ordinary token of the tiny vocabulary."""
    bpe = tokenizer.backend_tokenizer.model
    added = set(tokenizer.added_tokens_decoder)
    mismatched = [
        token
        for token, token_id in tokenizer.get_vocab().items()
        if token_id not in added and [t.id for t in bpe.tokenize(token)] != [token_id]
    ]
    assert mismatched == []


def test_padded_vocabulary_rows_are_unused(tokenizer):
    vocab = tokenizer_vocab(tokenizer, 1030)
    assert (vocab.model, vocab.pre, vocab.scores) == ("gpt2", "llama-bpe", None)
    assert vocab.tokens[1024:] == [f"[PAD{i}]" for i in range(1024, 1030)]
    assert set(vocab.token_types[1024:]) == {gguf.TokenType.UNUSED}


def _with_pre_tokenizer(pre_tokenizer, normalizer=None):
    other = load_tokenizer("tiny")
    other.backend_tokenizer.pre_tokenizer = pre_tokenizer
    other.backend_tokenizer.normalizer = normalizer
    return other


def test_byte_level_splits_llama_cpp_knows_are_named():
    """llama.cpp picks its split by ``tokenizer.ggml.pre``; each name here is one llama-vocab.cpp implements."""
    from tokenizers import pre_tokenizers as pre

    gpt2 = pre.ByteLevel(add_prefix_space=False, use_regex=True)
    smollm = pre.Sequence([pre.Digits(individual_digits=True), pre.ByteLevel(add_prefix_space=False)])
    assert gguf_tokenizer_kind(load_tokenizer("tiny")) == ("gpt2", "llama-bpe")
    assert gguf_tokenizer_kind(_with_pre_tokenizer(gpt2)) == ("gpt2", "gpt-2")
    assert gguf_tokenizer_kind(_with_pre_tokenizer(smollm)) == ("gpt2", "smollm")


def test_unsupported_tokenizer_and_model_are_refused(tokenizer, merged, tmp_path):
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers as pre

    refused = [
        _with_pre_tokenizer(pre.ByteLevel(add_prefix_space=True, use_regex=True)),  # a space llama.cpp never adds
        _with_pre_tokenizer(pre.Sequence([pre.Digits(individual_digits=False), pre.ByteLevel()])),
        _with_pre_tokenizer(pre.ByteLevel(add_prefix_space=False), normalizer=normalizers.NFKC()),
    ]
    for other in refused:
        with pytest.raises(GGUFExportError, match="pre-tokenizer"):
            tokenizer_vocab(other, 1024)
    merged.config.model_type = "mistral"
    try:
        with pytest.raises(GGUFExportError, match="LLaMA"):
            write_llama_gguf(tmp_path / "x.gguf", merged, tokenizer)
    finally:
        merged.config.model_type = "llama"


def test_llama3_rope_factors_match_transformers():
    """Llama 3.1's RoPE scaling: llama.cpp divides each frequency by rope_freqs; transformers scales inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
    )
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_parameters={"rope_theta": 500000.0, **scaling},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    np.testing.assert_allclose(llama3_rope_factors(config), (base / scaled.double()).numpy(), rtol=1e-5)
    assert llama3_rope_factors(LlamaConfig()) is None


def test_gguf_export_metadata_and_stop_tokens(exports, tokenizer):
    metadata = json.loads((exports["q8_0"] / METADATA_FILE).read_text())
    assert metadata["format"] == "gguf" and metadata["dtype"] == "q8_0"
    assert [w["file"] for w in metadata["weights"]] == [GGUF_FILE]
    assert metadata["stop_token_ids"] == stop_token_ids("llama3", tokenizer)


def test_unsupported_tokenizer_is_refused_before_the_model_loads(run_dir, tmp_path, monkeypatch):
    """The check reads the tokenizer and config.json only: loading and merging a real model first took 22 s on 135M."""
    import shutil

    import finetune.export as export_module
    from finetune.export import ExportError

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    tokenizer_json = json.loads((run / "tokenizer.json").read_text())
    tokenizer_json["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                       "use_regex": True}
    (run / "tokenizer.json").write_text(json.dumps(tokenizer_json))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the tokenizer was checked")

    monkeypatch.setattr(export_module, "load_model", no_model)
    for to in ("gguf", "ollama"):
        with pytest.raises(ExportError, match="pre-tokenizer") as error:
            export(run, to, tmp_path / to)
        assert "\n" not in str(error.value) and not (tmp_path / to).exists()
