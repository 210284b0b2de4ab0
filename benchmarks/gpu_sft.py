"""LoRA and QLoRA SFT of a Llama-3.2-1B-shaped LLaMA on one GPU: our recipe against TRL ``SFTTrainer`` defaults.

    python benchmarks/gpu_sft.py            # or: make bench   (one CUDA GPU; about 10 minutes on an H100)

On a machine without CUDA it prints one line and exits 0.

Arms, each in its own process so that peak memory is its own, all on the same data for the same number of steps:

- ``ours_lora`` / ``ours_qlora``: our recipe path: ``finetune.stages.sft.trl_arguments`` and
  ``finetune.models.load_base_model``, i.e. best-fit-decreasing packing into 2048-token rows, padding-free batches
  (FlashAttention's varlen path where ``attn_implementation: auto`` finds FlashAttention, else SDPA),
  Liger's fused RMSNorm / RoPE / SwiGLU where liger-kernel is installed, ``--ours_checkpointing`` activation
  checkpointing (selective by default), bf16, ``--ours_batch`` rows of 2048 per step.
- ``trl_lora`` / ``trl_qlora``: ``trl.SFTConfig`` defaults (padded batches of 8, no packing, SDPA, no Liger,
  gradient checkpointing on, bf16); only ``max_length`` is raised from 1024 to 2048 so that both arms see the same
  tokens, and the run length, logging and saving are set.
- ``ours_qlora_8b``: peak memory of our QLoRA recipe on a Llama-3-8B-shaped model, one packed row of 2048 tokens.

Models are randomly initialised in bf16 from the published shapes (no download) and saved once to ``--work_dir``.
Data is synthetic: conversations of random tokens whose lengths follow a log-normal distribution (median
``--median_length`` tokens, clipped to 2048), the first fifth of each masked as the prompt. Tokens per second count
the non-padding tokens that went through the model, over the steps after ``--warmup``. Model FLOPs utilisation is
``6 * N * tokens/s / peak`` with ``N`` the parameters that take part in a matmul (all but an untied input embedding)
and ``peak`` the device's dense bf16 peak (table below, or ``--peak_tflops``); the 6N convention counts the weight
gradients that LoRA does not compute, as is customary. Peak memory is ``torch.cuda.max_memory_allocated`` over the
whole arm (loading included). Results: ``benchmarks/results/gpu_sft_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# Published shapes (config.json of meta-llama/Llama-3.2-1B and meta-llama/Meta-Llama-3-8B).
SHAPES = {
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # --smoke: the same code path on a CPU in seconds (a check of this script, not a measurement)
    "smoke": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True, rope_theta=500000.0),
}

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' data sheets; first match of the device name
# wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (HBM3)
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
]

ARMS = {
    "ours_lora": ("ours", "lora", "llama3.2-1b"),
    "trl_lora": ("trl", "lora", "llama3.2-1b"),
    "ours_qlora": ("ours", "qlora", "llama3.2-1b"),
    "trl_qlora": ("trl", "qlora", "llama3.2-1b"),
    "ours_qlora_8b": ("ours", "qlora", "llama3-8b"),
}


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matmul per token: all of them, less an untied input embedding (a lookup)."""
    h, i, n, kv = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["num_key_value_heads"]
    head_dim = h // shape["num_attention_heads"]
    per_layer = h * h * 2 + 2 * h * kv * head_dim + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    return n * per_layer + h + shape["vocab_size"] * h  # final norm, LM head


def synthetic_rows(count: int, median: int, max_length: int, vocab: int, pad_id: int, seed: int) -> list[dict]:
    """``count`` conversations of random tokens (never ``pad_id``), log-normal lengths, the first fifth a prompt."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 0.7, count).astype(int), 32, max_length)
    rows = []
    for n in lengths:
        ids = rng.integers(pad_id + 1, vocab, int(n)).tolist()
        prompt = max(1, int(n) // 5)
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Child processes


def build_model_dir(shape_name: str, path: Path, smoke: bool) -> None:
    """A randomly initialised LLaMA of ``shape_name``, in bf16 (float32 for --smoke), with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune.models import load_tokenizer

    tokenizer = load_tokenizer("tiny")  # ids only matter as ids: the tiny tokenizer's pad id is inside every vocab
    config = LlamaConfig(max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape_name])
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    with torch.device("cpu" if smoke else "cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def step_clock(warmup: int):
    """A ``TrainerCallback`` timing the steps after ``warmup`` and counting the tokens they saw."""
    import torch
    from transformers import TrainerCallback

    def now():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepClock(TrainerCallback):
        start = end = None
        tokens_start = tokens_end = 0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start, self.tokens_start = now(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            self.end, self.tokens_end = now(), state.num_input_tokens_seen

    return StepClock()


def run_arm(arm: str, model_dir: str, rows_path: str, opts: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from finetune.config import SFTRunConfig, parse_args
    from finetune.kernels import choose_liger
    from finetune.models import load_base_model, load_tokenizer, lora_config, quantization_config
    from finetune.stages.sft import trl_arguments

    recipe, method, shape_name = ARMS[arm]
    smoke = opts["smoke"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rows = json.loads(Path(rows_path).read_text())
    tokenizer = load_tokenizer(model_dir)
    steps = opts["warmup"] + opts["steps"]
    out_dir = tempfile.mkdtemp(prefix=f"gpu-sft-{arm}-")
    batch = 1 if shape_name == "llama3-8b" else opts["ours_batch"]
    dtype = "float32" if smoke else "bfloat16"
    cfg = parse_args(
        SFTRunConfig,
        [
            f"--model.name={model_dir}",
            f"--model.dtype={dtype}",
            "--model.attn_implementation=auto",
            "--model.use_liger=true",
            f"--model.activation_checkpointing={opts['ours_checkpointing']}",
            f"--adapter.method={method}",
            f"--data.max_length={opts['max_length']}",
            "--data.packing=true",
            f"--train.per_device_batch_size={batch}",
            f"--train.max_steps={steps}",
            "--train.learning_rate=2e-4",
            "--train.warmup_ratio=0",
            "--train.logging_steps=1000",
            "--train.save_steps=1000",
        ],
    )
    if recipe == "ours":
        args = trl_arguments(cfg, Path(out_dir), has_eval=False)
        model = load_base_model(cfg.model, method)
        liger = choose_liger(True, cuda, _liger_installed()).on
    else:
        # TRL's defaults; only what keeps the arms comparable (length, steps) or runnable (no logging or saving).
        args = TRLSFTConfig(output_dir=out_dir, max_length=opts["max_length"], max_steps=steps,
                            **({"bf16": False, "use_cpu": True} if smoke else {}))
        torch_dtype = torch.float32 if smoke else torch.bfloat16
        kwargs = dict(dtype=torch_dtype, attn_implementation="sdpa")
        if method == "qlora":
            kwargs["quantization_config"] = quantization_config(torch_dtype)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        liger = False
    args.report_to = []
    args.save_strategy = "no"
    args.logging_steps = 10**6
    args.disable_tqdm = True
    args.include_num_input_tokens_seen = "non_padding"
    clock = step_clock(opts["warmup"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(cfg.adapter), callbacks=[clock])
    result = trainer.train()
    seconds = clock.end - clock.start
    tokens = clock.tokens_end - clock.tokens_start
    base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
    return {
        "arm": arm,
        "recipe": recipe,
        "method": method,
        "shape": shape_name,
        "attn_implementation": base.config._attn_implementation,
        "liger": liger,
        "activation_checkpointing": opts["ours_checkpointing"] if recipe == "ours" else "full (TRL default)",
        "per_device_batch_size": args.per_device_train_batch_size,
        "packing": bool(args.packing),
        "padding_free": bool(args.padding_free),
        "steps_timed": steps - opts["warmup"],
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
        "train_loss": result.training_loss,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }


def _liger_installed() -> bool:
    try:
        from transformers.utils import is_liger_kernel_available

        return is_liger_kernel_available()
    except ImportError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# Report


def table(results: dict) -> str:
    arms = results["arms"]
    lines = [
        f"SFT on {results['device']}: Llama-3.2-1B shape, random init, {results['dtype']}, "
        f"{results['max_length']}-token rows, {results['steps']} timed steps after {results['warmup']}, synthetic "
        f"conversations (median {results['median_length']} tokens)",
        "",
        "| arm | attention | Liger | checkpointing | tokens/s | MFU | peak GiB | loss |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for name, r in arms.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['attn_implementation']} | {'on' if r['liger'] else 'off'} | {r['activation_checkpointing']} "
            f"| {r['tokens_per_second']:,.0f} | {fmt(r.get('mfu'), '.1%')} | {fmt(r['peak_memory_gib'], '.2f')} "
            f"| {r['train_loss']:.3f} |"
        )
    if results.get("ratios"):
        lines += ["", "| ours / TRL defaults | tokens/s | peak memory |", "|---|---:|---:|"]
        for method, ratio in results["ratios"].items():
            lines.append(f"| {method} | {fmt(ratio['tokens_per_second'], '.2f')} | {fmt(ratio['peak_memory'], '.2f')} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--median_length", type=int, default=600, help="median synthetic conversation length")
    parser.add_argument("--conversations", type=int, default=4000)
    parser.add_argument("--ours_batch", type=int, default=4, help="packed rows per step in our arms (1 for the 8B)")
    parser.add_argument("--ours_checkpointing", choices=["none", "full", "selective"], default="selective")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS))
    parser.add_argument("--peak_tflops", type=float, help="the device's dense bf16 peak, if not in the table")
    parser.add_argument("--work_dir", type=Path, help="where the random models go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/gpu_sft_<device>.json)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the code path on CPU, tiny shapes
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker_args", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")

    if args.worker:
        spec = json.loads(args.worker_args)
        if args.worker == "build":
            build_model_dir(spec["shape"], Path(spec["path"]), spec["smoke"])
            return 0
        try:
            measured = run_arm(args.worker, spec["model_dir"], spec["rows"], spec["opts"])
        except Exception as e:  # one failing arm must not lose the others' figures
            import traceback

            traceback.print_exc()
            measured = {"arm": args.worker, "error": f"{type(e).__name__}: {e}"}
        Path(spec["out"]).write_text(json.dumps(measured))
        return 0

    import torch

    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_sft: no CUDA GPU on this machine; this benchmark needs one, skipped (exit 0).")
        return 0
    arms = [a for a in args.arms.split(",") if a]
    if set(arms) - set(ARMS):
        parser.error(f"--arms must be among {', '.join(ARMS)}")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (smoke run, not a measurement)"
    peak = args.peak_tflops or peak_tflops(device)
    opts = dict(smoke=args.smoke, steps=args.steps, warmup=args.warmup, max_length=args.max_length,
                ours_batch=args.ours_batch, ours_checkpointing=args.ours_checkpointing)
    slug = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    out = args.out or RESULTS / f"gpu_sft_{'smoke' if args.smoke else slug}.json"
    results = {
        "device": device,
        "peak_bf16_tflops": peak,
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": "float32" if args.smoke else "bfloat16",
        "max_length": args.max_length,
        "median_length": args.median_length,
        "steps": args.steps,
        "warmup": args.warmup,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "arms": {},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu-sft-"))
    work.mkdir(parents=True, exist_ok=True)

    def child(worker: str, spec: dict) -> None:
        cmd = [sys.executable, __file__, "--worker", worker, "--worker_args", json.dumps(spec)]
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)

    try:
        from finetune.models import load_tokenizer

        pad_id = load_tokenizer("tiny").pad_token_id
        rows_path = work / "rows.json"
        vocab = SHAPES["smoke" if args.smoke else "llama3.2-1b"]["vocab_size"]
        median = results["median_length"] = min(args.median_length, args.max_length // 2)
        rows_path.write_text(json.dumps(synthetic_rows(args.conversations, median, args.max_length, vocab, pad_id, 0)))
        model_dirs: dict[str, Path] = {}
        for arm in arms:
            shape = "smoke" if args.smoke else ARMS[arm][2]
            if shape not in model_dirs:
                model_dirs[shape] = work / shape
                if not (model_dirs[shape] / "config.json").exists():
                    print(f"building a random {shape} model in {model_dirs[shape]}", flush=True)
                    child("build", {"shape": shape, "path": str(model_dirs[shape]), "smoke": args.smoke})
            arm_out = work / f"{arm}.json"
            print(f"running {arm}", flush=True)
            child(arm, {"model_dir": str(model_dirs[shape]), "rows": str(rows_path), "opts": opts, "out": str(arm_out)})
            r = json.loads(arm_out.read_text())
            if "error" not in r:
                shape_cfg = SHAPES["smoke" if args.smoke else r["shape"]]
                r["matmul_params"] = matmul_params(shape_cfg)
                r["mfu"] = 6 * r["matmul_params"] * r["tokens_per_second"] / (peak * 1e12) if peak else None
                peak_gib = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
                print(f"  {r['tokens_per_second']:,.0f} tokens/s, peak GPU memory {peak_gib} GiB", flush=True)
            else:
                print(f"  failed: {r['error']}", flush=True)
            results["arms"][arm] = r
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    results["ratios"] = {}
    for method in ("lora", "qlora"):
        ours, base = results["arms"].get(f"ours_{method}"), results["arms"].get(f"trl_{method}")
        if ours and base and "error" not in ours and "error" not in base:
            results["ratios"][method] = {
                "tokens_per_second": ours["tokens_per_second"] / base["tokens_per_second"],
                "peak_memory": (ours["peak_memory_gib"] / base["peak_memory_gib"]) if base["peak_memory_gib"] else None,
            }
    text = table(results)
    write_report(out, results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
