"""Batched sampling (``finetune.generation.generate``: left-padded batches, KV cache) against one prompt at a time.

    python benchmarks/sampling_throughput.py            # tiny LLaMA, CPU; --device cuda on a GPU

Both arms answer the same suite prompts greedily with the same model and the same stop tokens, so they produce the
same tokens (tests/integration/test_generation.py checks that left padding changes nothing); each arm's generated tokens
(the stop token included) are divided by its wall time. Goal: batched >= 5x one at a time. Results go to
``benchmarks/results/sampling_throughput_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def measure(num_prompts: int, max_new_tokens: int, batch_size: int, device: str) -> dict:
    import torch

    from finetune.config import ModelConfig
    from finetune.data import load_conversations, prompt_and_reference
    from finetune.generation import Decoding, generate
    from finetune.models import load_base_model, load_tokenizer
    from finetune.templates import get_template, render_prompt, stop_token_ids

    tokenizer = load_tokenizer("tiny")
    template = get_template("llama3", tokenizer)
    model = load_base_model(ModelConfig(), for_training=False).to(device).eval()
    convs = load_conversations("bundled:suite_messages_eval.jsonl", limit=num_prompts)
    prompts = [render_prompt(template, prompt_and_reference(c)[0], tokenizer) for c in convs]
    stops = stop_token_ids(template, tokenizer)
    greedy = Decoding(max_new_tokens=max_new_tokens)
    generate(model, tokenizer, prompts[:2], stops, greedy, batch_size=2)  # warm-up

    arms = {}
    for name, size in (("batched", batch_size), ("one_at_a_time", 1)):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        completions = generate(model, tokenizer, prompts, stops, greedy, batch_size=size)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) + c.stopped for c in completions)
        arms[name] = {"batch_size": size, "seconds": seconds, "generated_tokens": tokens,
                      "tokens_per_second": tokens / seconds, "texts": [c.text for c in completions]}
    same = arms["batched"].pop("texts") == arms["one_at_a_time"].pop("texts")
    return {
        "model": "tiny (embedded LLaMA, 4 layers, hidden 128)",
        "device": device,
        "machine": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "num_prompts": num_prompts,
        "max_new_tokens": max_new_tokens,
        "arms": arms,
        "same_completions": same,
        "speedup": arms["batched"]["tokens_per_second"] / arms["one_at_a_time"]["tokens_per_second"],
        "goal": ">= 5x",
    }


def table(result: dict) -> str:
    lines = [
        f"Sampling throughput, {result['model']}, {result['device']}, {result['num_prompts']} suite prompts, greedy, "
        f"up to {result['max_new_tokens']} new tokens",
        "",
        "| arm | batch | generated tokens | seconds | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, arm in result["arms"].items():
        lines.append(f"| {name} | {arm['batch_size']} | {arm['generated_tokens']} | {arm['seconds']:.2f} | "
                     f"{arm['tokens_per_second']:.0f} |")
    lines += ["", f"Batched / one at a time: **{result['speedup']:.1f}x** (goal {result['goal']}); identical "
                  f"completions: {result['same_completions']}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_prompts", type=int, default=128)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    result = measure(args.num_prompts, args.max_new_tokens, args.batch_size, args.device)
    text = table(result)
    write_report(RESULTS / f"sampling_throughput_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json", result, text)
    print(text)


if __name__ == "__main__":
    main()
