"""The embedded default: a tiny LLaMA and its tokenizer, built locally and deterministically.

``tiny_model_dir()`` returns a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load like any hub checkpoint, so every code path used for a real Llama 2/3 is the
one the tests and the demo exercise. It is built on first use (a few seconds) and cached.

The architecture is LLaMA's: RMSNorm, SwiGLU MLP, rotary position embeddings and grouped-query attention with fewer
key/value heads than query heads. The tokenizer is a byte-level BPE with Llama 3's pre-tokenizer split and special
tokens, trained on the bundled suite and the chat templates' fixed text.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny"
# Bump when anything below changes what gets built, so stale caches are never reused.
TINY_VERSION = 1

LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
)
# Tokens other templates spell out (Llama 2 / Vicuna / Alpaca use <s> </s>; ChatML uses <|im_start|> <|im_end|>),
# so the tiny model can train with every template.
EXTRA_SPECIAL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 1024

# Llama 3's pre-tokenizer split (tiktoken's cl100k pattern): digits in groups of up to three, contractions, words.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

MODEL_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    initializer_range=0.02,
)


def cache_root() -> Path:
    """Where built artefacts are cached: ``$FINETUNE_CACHE`` or ``~/.cache/finetune``."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


def _training_corpus() -> list[str]:
    from .suite import generate

    texts = []
    for split in generate().values():
        for r in split:
            texts += [r["prompt"], r["answer"], r["wrong"]]
    # The fixed text of the templates, so that their headers become a few tokens rather than dozens of bytes.
    texts += [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.",
        "### Instruction:\n### Input:\n### Response:\n",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        " USER: ASSISTANT: [INST] [/INST] <<SYS>>\n\n<</SYS>>\n\n system user assistant\n\n",
        "You are a helpful assistant. Answer briefly.",
    ]
    return texts


def build_tokenizer():
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) with the Llama 3 special tokens and a pad token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [*LLAMA3_SPECIAL_TOKENS, *EXTRA_SPECIAL_TOKENS, PAD_TOKEN]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(specials),
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    # Special tokens go last, as in Llama 3 (128000+), so ordinary ids do not depend on how many there are.
    tok.add_special_tokens(specials)
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def build_model(tokenizer, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` of :data:`MODEL_SHAPE`, identical for the same seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _fingerprint() -> str:
    source = Path(__file__).read_bytes() + Path(__file__).with_name("suite.py").read_bytes()
    return hashlib.sha256(source).hexdigest()[:12]


def tiny_model_dir(root: Path | None = None) -> Path:
    """Build the tiny model directory once (atomically) and return its path.

    The cache key covers this file and the suite, so editing either rebuilds instead of reusing a stale model.
    """
    root = Path(root) if root is not None else cache_root()
    target = root / f"tiny-v{TINY_VERSION}-{_fingerprint()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "finetune_tiny.json").write_text(json.dumps({"version": TINY_VERSION, "shape": MODEL_SHAPE}))
        try:
            os.replace(staging, target)
        except OSError:  # another process finished first; theirs is identical
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
