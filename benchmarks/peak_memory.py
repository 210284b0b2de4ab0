"""What the peak-memory benchmarks share (``ppo_memory.py``, ``dpo_memory.py``): the model, the stand-in SFT run,
and each arm measured in its own process.

The model is a LLaMA big enough for its weights to dominate the measurement (8 layers, hidden 768: 52M parameters,
fp32, the tiny tokenizer's 1024-token vocabulary), built from a seeded config, no download. The stand-in SFT run
is a LoRA adapter (r=16 on every linear) with small random ``lora_B`` so that it differs from the base, as a
trained adapter does. Peak memory counts from just before an arm loads its models: on CPU the peak resident memory
of the process minus its resident memory then (imports excluded, so every arm imports the same modules first), on
CUDA the peak allocated CUDA memory.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4)
# --shape: the default above, or Llama-3.2-1B's body (with the tiny tokenizer's vocabulary: 0.98B parameters), where
# the weights outweigh a small batch's activations as they do for the 7-8B models users train.
SHAPES = {
    "52m": SHAPE,
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8),
}
LORA = dict(r=16, alpha=32, dropout=0.0)
RESULT_PREFIX = "RESULT "


def rss_mb() -> float:
    """Current resident memory of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def processor_description() -> str:
    """The CPU's model name and the cores this process may use, e.g. ``AMD EPYC, 2 cores``."""
    name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), None) if Path("/proc/cpuinfo").is_file() else None
    return f"{name or platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"


def model_description(base_parameters: int, shape: dict = SHAPE) -> str:
    return f"LLaMA {shape}, {base_parameters / 1e6:.0f}M parameters, fp32; LoRA r={LORA['r']} on every linear"


def measure_description(device: str) -> str:
    if device.startswith("cuda"):
        return "peak CUDA memory allocated"
    return "peak resident memory of the process minus its resident memory before loading"


def build_base(base_dir: Path, shape: dict = SHAPE) -> int:
    """A randomly initialised LLaMA of ``shape`` with the tiny tokenizer (its vocabulary and special ids), saved as
    a model directory ``model.name`` can point at; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune.models import load_tokenizer
    from finetune.tiny import tiny_model_dir

    tiny = json.loads((tiny_model_dir() / "config.json").read_text())
    config = LlamaConfig(**{**{k: tiny[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id",
                                                    "max_position_embeddings", "rms_norm_eps")}, **shape})
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in base.parameters())
    base.save_pretrained(base_dir)
    load_tokenizer("tiny").save_pretrained(base_dir)
    return n_params


def build_base_and_sft(directory: Path, shape: dict = SHAPE) -> dict:
    """A base model directory (:func:`build_base`) and a stand-in SFT run (LoRA adapter + config.yaml) on it:
    ``{"base", "sft", "base_parameters"}``."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    from finetune.config import AdapterConfig, ModelConfig, SFTRunConfig
    from finetune.models import lora_config
    from finetune.runs import write_config

    base_dir, sft_dir = directory / "base", directory / "sft"
    n_params = build_base(base_dir, shape)
    adapter = AdapterConfig(**LORA)

    sft = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), lora_config(adapter))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.01)
    sft.save_pretrained(sft_dir)
    write_config(sft_dir, SFTRunConfig(output_dir=str(sft_dir), model=ModelConfig(name=str(base_dir)), adapter=adapter))
    return {"base": str(base_dir), "sft": str(sft_dir), "base_parameters": n_params}


def measure(arm: str, fn: Callable[[], object], device: str) -> None:
    """Run ``fn`` (one arm) and print its peak memory as a ``RESULT`` line for :func:`run_arm`. Call it after the
    imports every arm shares, so that they count in none."""
    import torch

    torch.manual_seed(0)
    before = rss_mb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    fn()
    result = {"arm": arm, "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "peak_mb": peak_rss_mb() - before}
    if device.startswith("cuda"):
        result["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_arm(script: str, child_args: list[str]) -> dict:
    """``python SCRIPT CHILD_ARGS`` in a fresh process (so no arm inherits another's peak); its ``RESULT`` line."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, script, *child_args], env=env, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode or not lines:
        raise SystemExit(f"{script} {' '.join(child_args[:4])} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def write_results(stem: str, device: str, result: dict, text: str, suffix: str = "") -> None:
    """``benchmarks/results/<stem>_<cpu|cuda><suffix>.json`` and ``.md``."""
    write_report(RESULTS / f"{stem}_{'cuda' if device.startswith('cuda') else 'cpu'}{suffix}.json", result, text)
