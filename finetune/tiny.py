"""The embedded default: a tiny LLaMA and its tokenizer, built locally and deterministically.

``tiny_model_dir()`` returns a directory that ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load like any hub checkpoint, so every code path used for a real Llama 2/3 is the
one the tests and the demo exercise.

A randomly initialised base gives LoRA nothing to adapt (measured: three epochs of LoRA SFT moved the loss from 6.9
to 6.05 and answered nothing), so the tiny base is *pretrained*: on plain ``Question: ... Answer: ...`` documents
(no chat markup) drawn from the suite's task families, never from its eval split. That takes minutes on a CPU, so
the result ships in ``finetune/tiny_base/`` (a few MB) and ``python -m finetune.tiny --rebuild`` regenerates it
deterministically.

The architecture is LLaMA's: RMSNorm, SwiGLU MLP, rotary position embeddings and grouped-query attention with fewer
key/value heads than query heads. The tokenizer is a byte-level BPE with Llama 3's pre-tokenizer split and special
tokens, trained on the bundled suite and the chat templates' fixed text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

TINY_NAME = "tiny"
# Bump when anything below changes what gets built, so stale caches are never reused.
TINY_VERSION = 3

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


PRETRAIN_DOCUMENTS = 24000
PRETRAIN_SEED = 7
# 4 epochs answered 9% of the eval prompts in plain Q/A form; on this 12-epoch schedule word reversal and sorting
# are learned between epochs 4 and 7 (7% -> 75%), 84% at the end (rebuild() measures it after every epoch).
PRETRAIN_EPOCHS = 12
PRETRAIN_LR = 3e-3
PRETRAIN_ROW = 128
PRETRAIN_BATCH = 32


def pretraining_documents(count: int = PRETRAIN_DOCUMENTS, seed: int = PRETRAIN_SEED) -> list[str]:
    """Plain-text ``Question:\n...\nAnswer:\n...`` documents from the suite's task families, excluding every eval
    prompt. No chat markup: the base knows the tasks but not how to answer in a conversation, which SFT teaches.

    Prompt and answer each start a line, as they start a turn in every chat template (after ``\n\n`` in Llama 3's):
    with ``Answer: cake`` the answer's first word would be BPE's `` cake``, a different token from the ``cake`` a
    chat reply starts with, and the fine-tuned model could not copy it (measured: SFT sorted words answered
    ``cherry carpet walnut`` for ``drum carpet walnut``, 16.5% accuracy from a base at 88%)."""
    from .suite import generate, pretraining_prompts

    held_out = {r["prompt"] for r in generate()["eval"]}
    return [f"Question:\n{p}\nAnswer:\n{a}" for p, a in pretraining_prompts(count, seed, exclude=held_out)]


def pretrain(model, tokenizer, epochs: int = PRETRAIN_EPOCHS, seed: int = 0, log=print) -> list[float]:
    """Deterministic full-weight causal-LM pretraining on :func:`pretraining_documents`, concatenated with EOS
    between documents and cut into rows of ``PRETRAIN_ROW`` tokens. Returns the mean loss of each epoch."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    for doc in pretraining_documents():
        stream += tokenizer(doc, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    rows = torch.tensor(stream[: len(stream) // PRETRAIN_ROW * PRETRAIN_ROW]).view(-1, PRETRAIN_ROW)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01)
    steps = epochs * math.ceil(len(rows) / PRETRAIN_BATCH)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PRETRAIN_LR, total_steps=steps, pct_start=0.05)
    model.train()
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(rows), generator=generator)
        total = 0.0
        for start in range(0, len(rows), PRETRAIN_BATCH):
            batch = rows[order[start : start + PRETRAIN_BATCH]]
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(batch)
        losses.append(total / len(rows))
        log(f"pretraining epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f}")
    model.eval()
    return losses


def plain_qa_accuracy(model, tokenizer) -> tuple[float, dict[str, float]]:
    """Greedy accuracy on the suite's eval prompts asked in the pretraining's own ``Question:\n / Answer:\n`` form (the
    answer is the first line of the reply): what the base knows before any chat fine-tuning. Returns the overall
    fraction and the fraction per task family. Greedy decoding draws no random numbers, so calling this between
    pretraining epochs leaves the training unchanged."""
    from collections import defaultdict

    from .generation import Decoding, generate
    from .suite import generate as suite_records
    from .suite import verify

    records = suite_records()["eval"]
    prompts = [tokenizer(f"Question:\n{r['prompt']}\nAnswer:\n", add_special_tokens=False).input_ids for r in records]
    newline = tokenizer.convert_tokens_to_ids("\u010a")  # byte-level BPE's "\n"
    was_training = model.training
    model.eval()
    replies = generate(model, tokenizer, prompts, [tokenizer.eos_token_id, newline], Decoding(max_new_tokens=24))
    model.train(was_training)
    per_family = defaultdict(list)
    for record, reply in zip(records, replies):
        per_family[record["task"]].append(verify(record["prompt"], reply.text.split("\n")[0]))
    overall = sum(sum(v) for v in per_family.values()) / len(records)
    return overall, {name: sum(v) / len(v) for name, v in sorted(per_family.items())}


SHIPPED_DIR = Path(__file__).resolve().parent / "tiny_base"


def tiny_model_dir() -> Path:
    """The shipped tiny base (config, weights, tokenizer), loadable with ``from_pretrained``."""
    if not (SHIPPED_DIR / "config.json").is_file():
        raise FileNotFoundError(f"{SHIPPED_DIR} is missing; run: python -m finetune.tiny --rebuild")
    return SHIPPED_DIR


def rebuild(target: Path = SHIPPED_DIR) -> Path:
    """Regenerate the tiny base from scratch: tokenizer, random init, pretraining (about 15 minutes on 2 CPU cores).

    Written to a staging directory and renamed into place, so an interrupted rebuild leaves the old one intact.
    """
    import torch

    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    accuracies = []

    def log(message: str) -> None:
        accuracies.append(plain_qa_accuracy(model, tokenizer))
        overall, per_family = accuracies[-1]
        print(f"{message} | plain Q/A accuracy {overall:.3f} {({k: round(v, 2) for k, v in per_family.items()})}")

    losses = pretrain(model, tokenizer, log=log)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        info = {"version": TINY_VERSION, "shape": MODEL_SHAPE, "pretrain_losses": losses,
                "pretrain_plain_qa_accuracy": [{"overall": a, **f} for a, f in accuracies]}
        (staging / "finetune_tiny.json").write_text(json.dumps(info, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--rebuild"]:
        sys.exit("usage: python -m finetune.tiny --rebuild")
    print(rebuild())
