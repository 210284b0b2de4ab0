"""Peak memory of per-token log-probs with a Llama-3-sized vocabulary: full logits against chunks.

    python benchmarks/logprobs_memory.py            # or: make bench   (CPU, about a minute)

DPO, PPO, rejection sampling and evaluation need only ``log p(label)`` at each position. Three ways to get it from
the final hidden states ``[B, T, H]`` and ``lm_head.weight`` ``[V, H]``:

- ``naive``: ``log_softmax(hidden @ W.T)`` over the full ``[B, T, V]`` float32 logits, then gather (what most code
  does with ``model(...).logits``);
- ``rowwise``: the full logits, then ``finetune.logprobs.token_logprobs`` (gather minus logsumexp one batch row at
  a time, no ``log_softmax`` copy);
- ``chunked``: ``finetune.logprobs.chunked_token_logprobs`` (what ``finetune.logprobs.policy_token_logprobs`` runs):
  ``chunk`` positions at a time (by default as many as fit 64 MiB of float32 logits: 130 for this vocabulary) under
  activation checkpointing, never the full logits.

Each variant runs in its own process, for inference (``no_grad``) and for training (forward and backward into the
hidden states and the head). The figure is the peak resident memory above what the inputs already hold (Linux's
high-water mark, reset just before the measured call through ``/proc/self/clear_refs``; large allocations are
mmapped so that freed memory leaves the resident set). Results go to
``benchmarks/results/logprobs_memory_cpu.json`` and a table (``.md`` beside it, and stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

VARIANTS = {
    "naive": "full [B, T, V] float32 logits, log_softmax, gather",
    "rowwise": "full logits, finetune.logprobs.token_logprobs (row-wise logsumexp)",
    "chunked": "finetune.logprobs.chunked_token_logprobs (chunks of positions, checkpointed)",
}
PHASES = ("inference", "training")


# ---------------------------------------------------------------------------------------------------------------
# Resident-memory peak of one call (Linux), shared with benchmarks/checkpointing.py


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _release_freed_memory() -> None:
    """From here on glibc serves every allocation of 128 KiB or more with its own mmap and unmaps it when freed, and
    freed heap memory goes back to the kernel now, so that resident memory follows what is live (a freed heap block
    would otherwise stay resident and be reused unseen, understating the next peak). No-op without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """``with PeakRSS() as peak: ...`` then ``peak.mib``: the highest resident memory reached inside the block, above
    the resident memory at its start, in MiB. Resets the kernel's high-water mark (``VmHWM``) on entry, after
    :func:`_release_freed_memory` (which slows later allocations a little: time outside such a block)."""

    def __enter__(self):
        import gc

        gc.collect()
        _release_freed_memory()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start_kib = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mib = (_status_kib("VmHWM") - self.start_kib) / 1024
        return False


def peak_rss_supported() -> bool:
    try:
        with PeakRSS():
            pass
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------


def worker(variant: str, phase: str, batch: int, seq: int, hidden: int, vocab: int, chunk: int, seed: int) -> dict:
    """Build the inputs, then measure one call of ``variant`` (runs in a child process)."""
    import torch

    from finetune.logprobs import chunked_token_logprobs, token_logprobs

    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, seq, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels[:, : seq // 8] = -100  # a prompt that does not count
    training = phase == "training"
    hidden_states.requires_grad_(training)
    weight.requires_grad_(training)

    def run(hidden_states, weight, labels):
        if variant == "chunked":
            return chunked_token_logprobs(hidden_states, weight, labels, chunk_size=chunk)
        logits = (hidden_states @ weight.t()).float()
        if variant == "rowwise":
            return token_logprobs(logits, labels)
        safe = labels.clamp(min=0)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        return logp.masked_fill(labels == -100, 0.0)

    def step(*inputs):
        with torch.set_grad_enabled(training):
            per_token = run(*inputs)
            total = per_token.sum()
            if training:
                (-total).backward()
        return per_token, total

    # Warm-up on small inputs of the same kind: lazy imports and one-off initialisation stay out of the figure.
    step(
        hidden_states[:1, :8].detach().clone().requires_grad_(training),
        weight[:64].detach().clone().requires_grad_(training),
        labels[:1, :8].clamp(max=63),
    )
    with PeakRSS() as peak:
        start = time.perf_counter()
        per_token, total = step(hidden_states, weight, labels)
        seconds = time.perf_counter() - start
    out = {
        "variant": variant,
        "phase": phase,
        "peak_mib_above_inputs": peak.mib,
        "seconds": seconds,
        "sum_logprobs": total.item(),
        "logprobs_head": per_token[0, seq // 8 : seq // 8 + 4].tolist(),
    }
    if training:
        out["grad_hidden_norm"] = hidden_states.grad.norm().item()
        out["grad_weight_norm"] = weight.grad.norm().item()
    return out


def table(results: dict) -> str:
    cfg = results["shape"]
    logits_mib = cfg["batch"] * cfg["seq"] * cfg["vocab"] * 4 / 2**20
    lines = [
        f"Per-token log-probs on {results['device']}: batch {cfg['batch']} x {cfg['seq']} tokens, hidden "
        f"{cfg['hidden']}, vocab {cfg['vocab']:,}, float32, chunk {cfg['chunk']} (one float32 copy of the full "
        f"logits is {logits_mib:,.0f} MiB)",
        "",
        "| phase | variant | peak MiB above inputs | x naive | seconds |",
        "|---|---|---:|---:|---:|",
    ]
    for phase in PHASES:
        base = results["runs"][f"naive/{phase}"]["peak_mib_above_inputs"]
        for variant in VARIANTS:
            r = results["runs"][f"{variant}/{phase}"]
            ratio = r["peak_mib_above_inputs"] / base if base > 0 else float("nan")
            lines.append(
                f"| {phase} | {variant} | {r['peak_mib_above_inputs']:,.0f} | {ratio:.3f} | {r['seconds']:.2f} |"
            )
    agree = results["agreement"]
    lines += [
        "",
        f"All variants agree: max |difference| of the summed log-probs {agree['sum_logprobs']:.2e} "
        f"(relative), of the gradient norms {agree['grad_norms']:.2e} (relative).",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=128256, help="Llama 3's vocabulary by default")
    parser.add_argument("--chunk", type=int, default=None,
                        help="positions per chunk of the chunked variant (default: finetune.logprobs.auto_chunk_size, "
                             "64 MiB of float32 logits)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each measured process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "logprobs_memory_cpu.json")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "PHASE"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk is None:
        from finetune.logprobs import auto_chunk_size

        args.chunk = auto_chunk_size(args.vocab)
    shape = dict(batch=args.batch, seq=args.seq, hidden=args.hidden, vocab=args.vocab, chunk=args.chunk)

    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        measured = worker(*args.worker, **shape, seed=args.seed)
        args.worker_out.write_text(json.dumps(measured))
        return 0

    if not peak_rss_supported():
        print("logprobs_memory: needs Linux's /proc/self/clear_refs to measure peak memory; skipped")
        return 0
    results = {
        "device": f"CPU ({os.cpu_count()} cores, {args.threads} torch thread(s))",
        "platform": platform.platform(),
        "shape": shape,
        "variants": VARIANTS,
        "runs": {},
    }
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    for phase in PHASES:
        for variant in VARIANTS:
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                cmd = [sys.executable, __file__, "--worker", variant, phase, "--worker_out", tmp.name,
                       "--threads", str(args.threads), "--seed", str(args.seed)]
                cmd += [f"--{k}={v}" for k, v in shape.items()]
                subprocess.run(cmd, check=True, env=env, cwd=ROOT)
                run = json.loads(Path(tmp.name).read_text())
            results["runs"][f"{variant}/{phase}"] = run
            print(f"{phase:9s} {variant:8s} peak {run['peak_mib_above_inputs']:8.0f} MiB  {run['seconds']:6.2f} s",
                  flush=True)

    def spread(key, phases=PHASES):
        values = [results["runs"][f"{v}/{p}"][key] for v in VARIANTS for p in phases]
        return (max(values) - min(values)) / max(abs(min(values)), 1e-12)

    results["agreement"] = {
        "sum_logprobs": spread("sum_logprobs"),
        "grad_norms": max(spread("grad_hidden_norm", ("training",)), spread("grad_weight_norm", ("training",))),
    }
    results["ratios_vs_naive"] = {
        f"{variant}/{phase}": results["runs"][f"{variant}/{phase}"]["peak_mib_above_inputs"]
        / results["runs"][f"naive/{phase}"]["peak_mib_above_inputs"]
        for phase in PHASES
        for variant in VARIANTS
    }
    text = table(results)
    write_report(args.out, results, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
