"""SFT throughput: our recipe (BFD packing, padding-free rows) against plain TRL ``SFTTrainer`` defaults.

    python benchmarks/sft_throughput.py                                  # or: make bench (tiny LLaMA, both data sets)
    python benchmarks/sft_throughput.py --shape 52m --datasets multiturn  # a 52M LLaMA (minutes)

Both arms train the same LLaMA with the same LoRA, on the same pre-tokenised conversations (so the loss is
the same quantity: assistant tokens only), for the same epochs, optimizer steps, learning rate and seed, one after
the other in this one run. The baseline keeps TRL's defaults for what a user who does not tune gets: padded batches
of 8 with no packing and activation checkpointing on. Ours packs the same conversations best-fit-decreasing into one
padding-free row per step, the row length chosen so that it takes as many steps as the baseline's batches of 8 (so
each update sees the same conversations' worth of tokens, and the eval losses compare like for like); with
``attn_implementation: auto`` and no FlashAttention each conversation in a row attends only to itself
(``sdpa_packed``). Each arm runs in its own process, so peak memory is its own.

Two training sets, each measured with both arms: ``suite``, the bundled single-turn conversations (20 to 24 tokens
each, so batches of 8 are 97% real tokens and packing has little to remove), and ``multiturn``, the same exchanges
chained into conversations of 1 to 8 turns (21 to 182 tokens, ``finetune.suite.multiturn``), the spread of
lengths chat data has. ``--shape 52m`` trains a randomly initialised 52M-parameter LLaMA (``peak_memory.SHAPES``,
the tiny tokenizer) instead of the tiny one, where the work per token outweighs the fixed cost of a step as it does
for the models users train.

Reported per arm: real (non-pad) tokens per second, optimizer steps, peak resident memory, final eval loss (the
same unpacked eval rows for both); and the ratios. Results go to ``benchmarks/results/sft_throughput_cpu.json``
(``--shape 52m``: ``sft_throughput_cpu_52m.json``) and a table on stdout (also written as ``.md`` beside the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import SHAPES, build_base
from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

ARMS = {
    "ours": "our recipe: BFD packing, one padding-free row per step, each conversation attending only to itself",
    "trl_defaults": "TRL SFTTrainer defaults: padded batches of 8, no packing, activation checkpointing on",
}


TRL_DEFAULT_BATCH = 8  # TrainingArguments.per_device_train_batch_size
DATASETS = {
    "suite": "bundled:suite_messages_train.jsonl",
    "multiturn": "bundled:suite_messages_multiturn_train.jsonl",
}


def packed_row_length(lengths: list[int], rows: int, longest: int) -> int:
    """The shortest row length, at least ``longest`` (so no conversation, train or eval, is cut), at which TRL's
    best-fit-decreasing packing puts ``lengths`` into at most ``rows`` rows."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    dataset = Dataset.from_dict({"input_ids": [[0] * n for n in lengths]})
    low, high = longest, max(longest, sum(lengths))
    while low < high:
        middle = (low + high) // 2
        if len(pack_dataset(dataset, middle, strategy="bfd")) <= rows:
            high = middle
        else:
            low = middle + 1
    return low


def worker(arm: str, dataset: str, model: str, samples: int, epochs: float, learning_rate: float, seed: int) -> dict:
    """Train one arm on one data set and return its measurements (runs in a child process)."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from finetune.config import SFTRunConfig, parse_args
    from finetune.data import load_conversations, tokenize_conversations
    from finetune.models import load_base_model, load_tokenizer, lora_config
    from finetune.stages.sft import trl_arguments
    from finetune.templates import get_template

    torch.manual_seed(seed)
    cfg = parse_args(
        SFTRunConfig,
        [
            f"--train.learning_rate={learning_rate}",
            f"--train.num_epochs={epochs}",
            f"--train.seed={seed}",
            f"--model.name={model}",
            f"--data.train={DATASETS[dataset]}",
            "--train.per_device_batch_size=1",
            "--data.max_length=256",
            "--train.logging_steps=1000",
            "--train.save_steps=1000",
        ],
    )
    tokenizer = load_tokenizer(model)
    template = get_template("llama3", tokenizer)
    train_rows, report = tokenize_conversations(
        load_conversations(cfg.data.train, limit=samples), template, tokenizer, cfg.data.max_length
    )
    eval_rows, _ = tokenize_conversations(load_conversations(cfg.data.eval), template, tokenizer, cfg.data.max_length)
    lengths = [len(row["input_ids"]) for row in train_rows]
    out = tempfile.mkdtemp(prefix=f"bench-{arm}-")
    if arm == "ours":
        args = trl_arguments(cfg, Path(out), has_eval=True)
        args.eval_packing = False
        steps_per_epoch = -(-len(train_rows) // TRL_DEFAULT_BATCH)
        longest = max(lengths + [len(row["input_ids"]) for row in eval_rows])
        args.max_length = packed_row_length(lengths, steps_per_epoch, longest)
    else:
        # Only what cannot stay default on a CPU-only box, or would make the arms incomparable, is set.
        args = TRLSFTConfig(
            output_dir=out,
            learning_rate=learning_rate,
            num_train_epochs=epochs,
            seed=seed,
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            lr_scheduler_type=cfg.train.lr_scheduler,
            warmup_steps=cfg.train.warmup_ratio,
            max_length=cfg.data.max_length,
        )
    args.report_to = []
    args.save_strategy = "no"
    args.logging_steps = 1000
    args.disable_tqdm = True
    model = load_base_model(cfg.model, "lora")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg.adapter),
    )
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    real_tokens = report.tokens * epochs
    return {
        "arm": arm,
        "description": ARMS[arm],
        "train_seconds": seconds,
        "optimizer_steps": result.global_step,
        "real_tokens": real_tokens,
        "real_tokens_per_second": real_tokens / seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_training_mib": rss_before / 1024,
        "train_loss": result.training_loss,
        "eval_loss": eval_loss,
        "packed_row_length": args.max_length if arm == "ours" else None,
        # The training set's, the same in both arms (``main`` moves them up to the data set's entry).
        "conversations": len(lengths),
        "min_tokens": min(lengths),
        "max_tokens": max(lengths),
        "padding_efficiency": padding_efficiency(lengths, TRL_DEFAULT_BATCH),
    }


DATA_FIGURES = ("conversations", "min_tokens", "max_tokens", "padding_efficiency")


def table(results: dict) -> str:
    rows = [
        ("real tokens / s", "real_tokens_per_second", "{:.0f}"),
        ("optimizer steps", "optimizer_steps", "{:d}"),
        ("train seconds", "train_seconds", "{:.1f}"),
        ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
        ("final eval loss", "eval_loss", "{:.4f}"),
    ]
    lines = [f"SFT throughput on {results['device']}, {results['model']} + LoRA, {results['epochs']} epoch(s), "
             f"same steps, learning rate and seed in both arms"]
    for name, measured in results["datasets"].items():
        ours, base = measured["arms"]["ours"], measured["arms"]["trl_defaults"]
        lines += [
            "",
            f"{name}: {measured['conversations']} conversations of {measured['min_tokens']}-{measured['max_tokens']} "
            f"tokens (batches of 8 are {measured['padding_efficiency']:.0%} real tokens); ours packs "
            f"{ours['packed_row_length']}-token rows, one per step",
            "",
            "| | ours | TRL defaults | ours / TRL |",
            "|---|---:|---:|---:|",
        ]
        for label, key, fmt in rows:
            ratio = ours[key] / base[key] if base[key] else float("nan")
            lines.append(f"| {label} | {fmt.format(ours[key])} | {fmt.format(base[key])} | {ratio:.2f} |")
    return "\n".join(lines)


def padding_efficiency(lengths: list[int], batch: int) -> float:
    """Real tokens over all tokens when consecutive ``lengths`` are padded to the longest of each ``batch``."""
    padded = sum(max(lengths[i : i + batch]) * len(lengths[i : i + batch]) for i in range(0, len(lengths), batch))
    return sum(lengths) / padded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    parser.add_argument("--shape", choices=["tiny", *SHAPES], default="tiny",
                        help="the tiny LLaMA (default) or a randomly initialised LLaMA of that shape")
    parser.add_argument("--samples", type=int, default=None, help="training conversations (default: all)")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/sft_throughput_cpu[_SHAPE].json)")
    parser.add_argument("--worker", choices=sorted(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_dataset", choices=sorted(DATASETS), help=argparse.SUPPRESS)
    parser.add_argument("--worker_model", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        measured = worker(args.worker, args.worker_dataset, args.worker_model, args.samples, args.epochs,
                          args.learning_rate, args.seed)
        args.worker_out.write_text(json.dumps(measured))
        return 0

    import torch

    scratch = tempfile.TemporaryDirectory(prefix="sft-throughput-")
    if args.shape == "tiny":
        model, description = "tiny", "tiny LLaMA (1.0M parameters, pretrained)"
    else:
        model = str(Path(scratch.name) / "base")
        parameters = build_base(Path(model), SHAPES[args.shape])
        description = f"LLaMA {SHAPES[args.shape]} ({parameters / 1e6:.0f}M parameters, random initialisation)"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    results = {
        "device": device,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "model": description,
        "shape": args.shape,
        "samples": args.samples,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "datasets": {},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for dataset in args.datasets:
        measured = {"data": DATASETS[dataset], "arms": {}}
        for arm in ARMS:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, __file__, "--worker", arm, "--worker_dataset", dataset, "--worker_model", model,
                       "--worker_out", tmp.name, "--epochs", str(args.epochs), "--learning_rate",
                       str(args.learning_rate), "--seed", str(args.seed)]
                if args.samples:
                    cmd += ["--samples", str(args.samples)]
                print(f"running {arm} on {dataset}: {ARMS[arm]}", flush=True)
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                measured["arms"][arm] = json.loads(Path(tmp.name).read_text())
        for arm in measured["arms"].values():
            measured.update({key: arm.pop(key) for key in DATA_FIGURES})
        ours, base = measured["arms"]["ours"], measured["arms"]["trl_defaults"]
        measured["ratios"] = {
            "tokens_per_second": ours["real_tokens_per_second"] / base["real_tokens_per_second"],
            "peak_rss": ours["peak_rss_mib"] / base["peak_rss_mib"],
            "eval_loss": ours["eval_loss"] / base["eval_loss"],
        }
        results["datasets"][dataset] = measured
    scratch.cleanup()
    text = table(results)
    suffix = "" if args.shape == "tiny" else f"_{args.shape}"
    write_report(args.out or RESULTS / f"sft_throughput_cpu{suffix}.json", results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
