"""Activation checkpointing none / full / selective: peak memory and step time of LoRA training on CPU.

    python benchmarks/checkpointing.py            # or: make bench   (CPU, a few minutes)

The model is a randomly initialised LLaMA larger than the embedded tiny one (hidden 512, 8 layers, GQA, the tiny
tokenizer's vocabulary, so the decoder layers and not the LM head hold the activations), saved once to a temporary
directory and loaded through ``finetune.models.load_base_model`` with ``model.activation_checkpointing`` set, and
LoRA on every linear layer (the recipe's default). A step is forward and backward of a batch of random tokens.

Each mode runs in its own process: one warm-up step, ``--steps`` timed steps (the median is reported), then one
step whose peak resident memory above what was resident before it is the memory figure (Linux's high-water mark,
reset through ``/proc/self/clear_refs``; large allocations mmapped so that freed memory leaves the resident set). ``trl_selective`` is TRL's own selective checkpointing
(``gradient_checkpointing_kwargs={"selective": True}``: only the attention output kept) for comparison. Results go to
``benchmarks/results/checkpointing_cpu.json`` and a table (``.md`` beside it, and stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from logprobs_memory import PeakRSS, peak_rss_supported  # noqa: E402
from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

MODES = {
    "none": "every activation kept",
    "full": "each decoder layer recomputed in the backward",
    "selective": "ours: linear-layer and attention outputs kept, norms / RoPE / SiLU recomputed",
    "trl_selective": "TRL's: only the attention output kept, the rest recomputed",
}


def model_shape(layers: int, hidden: int) -> dict:
    return dict(
        hidden_size=hidden,
        intermediate_size=int(hidden * 3.5),  # Llama 3 8B's 14336 / 4096
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )


def build_model_dir(path: Path, layers: int, hidden: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **model_shape(layers, hidden))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def worker(mode: str, model_dir: str, batch: int, seq: int, steps: int) -> dict:
    import torch
    from peft import get_peft_model

    from finetune.config import AdapterConfig, ModelConfig
    from finetune.models import load_base_model, lora_config

    ours = "none" if mode == "trl_selective" else mode
    model = load_base_model(ModelConfig(name=model_dir, activation_checkpointing=ours, use_liger=False), "lora")
    if mode == "trl_selective":
        from trl.models.selective_activation_checkpointing import enable_selective_activation_checkpointing

        enable_selective_activation_checkpointing(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(AdapterConfig()))
    model.train()
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.item()

    start = time.perf_counter()
    step()  # warm-up: one-off allocations and lazy initialisation stay out of the figures
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    with PeakRSS() as peak:  # last: measuring changes how memory is allocated, and so the time
        loss = step()
    return {
        "mode": mode,
        "description": MODES[mode],
        "peak_mib_step": peak.mib,
        "first_step_seconds": first,
        "step_seconds_median": statistics.median(times),
        "step_seconds": times,
        "loss": loss,
        "tokens_per_step": batch * seq,
    }


def table(results: dict) -> str:
    runs = results["runs"]
    base = runs["none"]
    s = results["shape"]
    lines = [
        f"Activation checkpointing on {results['device']}: LLaMA hidden {s['hidden']}, {s['layers']} layers, LoRA r=16 "
        f"on all linear layers, batch {s['batch']} x {s['seq']} tokens, forward + backward",
        "",
        "| mode | peak MiB (step) | x none | step s | x none | what is kept |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for mode, r in runs.items():
        lines.append(
            f"| {mode} | {r['peak_mib_step']:,.0f} | {r['peak_mib_step'] / base['peak_mib_step']:.2f} "
            f"| {r['step_seconds_median']:.2f} | {r['step_seconds_median'] / base['step_seconds_median']:.2f} "
            f"| {r['description']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (at least 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    parser.add_argument("--out", type=Path, default=RESULTS / "checkpointing_cpu.json")
    parser.add_argument("--worker", choices=sorted(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model_dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        measured = worker(args.worker, args.model_dir, args.batch, args.seq, args.steps)
        args.worker_out.write_text(json.dumps(measured))
        return 0

    if not peak_rss_supported():
        print("checkpointing: needs Linux's /proc/self/clear_refs to measure peak memory; skipped")
        return 0
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown or "none" not in modes:
        parser.error(f"--modes must include none and be among {', '.join(MODES)}; got {args.modes}")
    results = {
        "device": f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s))",
        "platform": platform.platform(),
        "shape": dict(layers=args.layers, hidden=args.hidden, batch=args.batch, seq=args.seq),
        "runs": {},
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        model_dir = Path(tmp) / "model"
        build_model_dir(model_dir, args.layers, args.hidden)
        for mode in modes:
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--worker", mode, "--model_dir", str(model_dir), "--worker_out", str(out),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--threads", str(args.threads)]
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            run = json.loads(out.read_text())
            results["runs"][mode] = run
            print(f"{mode:14s} peak {run['peak_mib_step']:7.0f} MiB  step {run['step_seconds_median']:6.2f} s  "
                  f"loss {run['loss']:.4f}", flush=True)
    base = results["runs"]["none"]
    results["ratios_vs_none"] = {
        mode: {
            "peak_memory": r["peak_mib_step"] / base["peak_mib_step"],
            "step_time": r["step_seconds_median"] / base["step_seconds_median"],
        }
        for mode, r in results["runs"].items()
    }
    text = table(results)
    write_report(args.out, results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
