"""A directory holding only Meta's ``tokenizer.model`` loads through ``load_tokenizer``, on the real files.

SentencePiece (Mistral v0.1's 32,000 pieces, LLaMA-style) must give sentencepiece's own ids on llama.cpp's reference
texts; Meta's Llama 3 tiktoken file must give llama.cpp's reference ids for Llama 3 and the special tokens Meta's
code adds (the file holds only the 128,000 ranks). Without the library that reads the file: one line naming it.
"""

import pytest
from factories import bare_copy, reference_cases  # noqa: E402

from finetune.config import ConfigError
from finetune.models import LLAMA3_SPECIAL_TOKENS, load_tokenizer


def test_sentencepiece_tokenizer_model_alone_loads_and_matches_sentencepiece(real_artifacts, tmp_path):
    from sentencepiece import SentencePieceProcessor

    directory = bare_copy(real_artifacts / "spm" / "tokenizer.model", tmp_path)
    tokenizer = load_tokenizer(str(directory))
    processor = SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    assert len(tokenizer) == processor.vocab_size() == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    texts = [text for text, _ in reference_cases(real_artifacts, "llama-spm")]
    texts += ["Hello world", " Hello", "[INST] What is 2 + 3? [/INST] 5", "tab\there\nnew line  two spaces 🦙"]
    mismatched = [t for t in texts if tokenizer.encode(t, add_special_tokens=False) != processor.encode(t)]
    assert mismatched == []


def test_llama3_tiktoken_model_alone_loads_with_metas_special_tokens(real_artifacts, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(str(bare_copy(real_artifacts / "llama3" / "tokenizer.model", tmp_path)))
    assert len(tokenizer) == 128256
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert tokenizer.convert_tokens_to_ids(names) == [128000, 128001, 128006, 128007, 128009]
    assert tokenizer.convert_tokens_to_ids(LLAMA3_SPECIAL_TOKENS) == list(range(128000, 128256))
    assert all(token.special for token in tokenizer.added_tokens_decoder.values())
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    cases = reference_cases(real_artifacts, "llama-bpe")
    assert [tokenizer.encode(text, add_special_tokens=False) for text, _ in cases] == [ids for _, ids in cases]

    # the same ids as the fast tokenizer.json of Llama 3, special tokens included
    reference = AutoTokenizer.from_pretrained(real_artifacts / "llama3")
    text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("artifact", "package"), [("spm", "sentencepiece"), ("llama3", "tiktoken")])
def test_a_missing_library_is_one_line_naming_it(real_artifacts, tmp_path, monkeypatch, artifact, package):
    import importlib.util

    directory = bare_copy(real_artifacts / artifact / "tokenizer.model", tmp_path)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        load_tokenizer(str(directory))
    message = str(error.value)
    assert "\n" not in message and f"pip install {package}" in message and str(directory) in message
