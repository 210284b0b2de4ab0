"""GRPO and RLOO on the bundled suite: verifier accuracy over seeds against the SFT model (and PPO's figure), then
PPO, GRPO and RLOO side by side for wall time per iteration and peak memory.

    python benchmarks/grpo_accuracy.py --sft runs/sft              # GRPO and RLOO for seeds 0 1 2 (CPU: ~20 min)
    python benchmarks/grpo_accuracy.py                             # trains the SFT run first (sft_lora.yaml)
    python benchmarks/grpo_accuracy.py --sft runs/sft --smoke      # every step end to end in minutes, tiny overrides

Accuracy: each run is the shipped recipe with the shipped tiny config (``recipes/configs/tiny/grpo_lora.yaml``,
``rloo_lora.yaml``), all from the same SFT run, the suite's verifier as the reward, and only the seeds changed
(``--sampling.seed``, ``--grpo.seed``). Accuracy is the fraction of the 200 held-out suite prompts whose greedy
answer the verifier accepts. Per method: each seed's accuracy, mean, spread (max - min), the KL to the reference at
the last iteration and its largest value, the rollout score over the first and the last 10 iterations. PPO's
accuracy is read from ``benchmarks/results/loop_accuracy_cpu.json`` (``benchmarks/loop_accuracy.py``, the same SFT
recipe and eval prompts), not rerun: its 240 iterations take longer than this whole benchmark.

Side by side: ``ppo_lora.yaml``, ``grpo_lora.yaml`` and ``rloo_lora.yaml`` each run ``--side-iterations`` iterations
(no eval) one after the other in their own process, the same 128 responses per iteration (PPO 32 prompts x 4, GRPO
and RLOO 16 x 8): the median wall time of an iteration after the first, and the peak resident memory of the process
(``ru_maxrss``, which includes torch's own ~0.5 GB; the difference between the arms is the critic). On a shared
machine the absolute times move with the load; the ratios, measured back to back, are the figures.
Results go to ``benchmarks/results/grpo_accuracy_cpu.json`` and ``.md`` (``--smoke``: ``*_smoke.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from loop_accuracy import recipe, stats
from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
METHODS = {"grpo": ("grpo", "grpo_lora.yaml"), "rloo": ("rloo", "rloo_lora.yaml")}
SIDE = {"ppo": ("ppo", "ppo_lora.yaml"), **METHODS}
SMOKE = ["--grpo.num_iterations=2", "--data.max_eval_samples=8", "--eval.num_samples=8", "--eval.max_new_tokens=8"]
WINDOW = 10  # iterations averaged for the first and last rollout score (one iteration's 16 prompts are noisy)
# ``python -c PEAK_WRAPPER RECIPE PEAK_FILE ARGS...``: runs RECIPE with ARGS in this process and writes its peak
# resident memory (KiB on Linux) to PEAK_FILE at exit.
PEAK_WRAPPER = ("import atexit, resource, runpy, sys; recipe, out = sys.argv.pop(1), sys.argv.pop(1); sys.argv[0] = recipe; "
                "atexit.register(lambda: open(out, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))); "
                "runpy.run_path(recipe, run_name='__main__')")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sft", help="an existing SFT run to start from (default: train one with sft_lora.yaml)")
    parser.add_argument("--runs", help="where the runs go (default runs/bench-grpo, with --smoke runs/bench-grpo-smoke)")
    parser.add_argument("--side-iterations", type=int, default=6, help="iterations of each side-by-side run")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --runs instead of rerunning")
    parser.add_argument("--smoke", action="store_true", help="2 iterations, 8 eval prompts: checks the script")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = str(ROOT / "runs" / ("bench-grpo-smoke" if args.smoke else "bench-grpo"))
    if args.smoke:
        args.side_iterations = 2
    return args


def rows_of(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def accuracy_run(method: str, sft: Path, out: Path, seed: int, smoke: bool, reuse: bool) -> dict:
    """One seed of GRPO or RLOO with the shipped tiny config; its summary with figures from its metrics."""
    name, config = METHODS[method]
    args = ["--config", str(CONFIGS / config), "--init", str(sft), "--output_dir", str(out), "--overwrite",
            f"--sampling.seed={seed}", f"--grpo.seed={seed}", *(SMOKE if smoke else [])]
    summary = recipe(name, args, out.with_suffix(".log"), reuse)
    rows = rows_of(out)
    window = min(WINDOW, len(rows))
    summary["max_kl"] = max(r["kl"] for r in rows)
    summary["first_score"] = sum(r["score"] for r in rows[:window]) / window
    summary["last_score"] = sum(r["score"] for r in rows[-window:]) / window
    summary["iteration_seconds"] = statistics.median(r["iteration_seconds"] for r in rows)
    return summary


def iteration_seconds(rows: list[dict], responses: int) -> list[float]:
    """Each iteration's wall time: GRPO logs it; PPO logs response tokens per second of the iteration."""
    return [r["iteration_seconds"] if "iteration_seconds" in r
            else r["response_length"] * responses / r["tokens_per_second"] for r in rows]


def side_run(method: str, sft: Path, out: Path, iterations: int) -> dict:
    """``iterations`` iterations of PPO, GRPO or RLOO, no eval, checkpoints or TensorBoard of note: the median
    iteration time after the first (which warms up) and the process's peak resident memory."""
    name, config = SIDE[method]
    section = "ppo" if method == "ppo" else "grpo"
    peak_file = out.with_suffix(".peak")
    args = ["--config", str(CONFIGS / config), "--init", str(sft), "--output_dir", str(out), "--overwrite",
            "--data.eval=null", f"--{section}.num_iterations={iterations}", f"--{section}.save_every=0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(ROOT / "recipes" / f"{name}.py"),
                               str(peak_file), *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"recipes/{name}.py failed (exit {proc.returncode}); see {out.with_suffix('.log')}")
    rows = rows_of(out)
    responses = 128  # both configs: PPO 32 prompts x 4 samples, GRPO/RLOO 16 x 8
    seconds = iteration_seconds(rows, responses)
    return {"iterations": len(rows), "iteration_seconds": seconds,
            "median_iteration_seconds": statistics.median(seconds[1:] or seconds),
            "peak_rss_mb": int(peak_file.read_text()) / 1024}


def table(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [f"Verifier accuracy on the {result['eval_prompts']} held-out suite prompts (greedy answers), tiny LLaMA, "
             f"CPU, seeds {seeds}; measured {result['date']} on a shared 2-core machine", "",
             "| model | accuracy per seed | mean | spread (max - min) |", "|---|---|---:|---:|",
             f"| SFT (`sft_lora.yaml`, one run) | {pct(result['sft']['eval_accuracy'])} | "
             f"{pct(result['sft']['eval_accuracy'])} | - |"]
    if result.get("ppo_reference"):
        ppo = result["ppo_reference"]
        lines.append(f"| PPO (`ppo_lora.yaml`, 240 iterations; `loop_accuracy_cpu.json`) | "
                     f"{', '.join(pct(v) for v in ppo['values'])} | {pct(ppo['mean'])} | {pct(ppo['spread'])} |")
    names = {"grpo": "GRPO (`grpo_lora.yaml`)", "rloo": "RLOO (`rloo_lora.yaml`)"}
    for key, name in names.items():
        if key in result:
            acc = result[key]["eval_accuracy"]
            lines.append(f"| {name}, {result[key]['iterations']} iterations | "
                         f"{', '.join(pct(v) for v in acc['values'])} | {pct(acc['mean'])} | {pct(acc['spread'])} |")
    lines.append("")
    for key in names:
        if key in result:
            r = result[key]
            lines.append(f"{key.upper()}: KL to the reference at the last iteration {r['final_kl']['mean']:.3f} nats per "
                         f"response (largest over the runs {r['max_kl']['max']:.3f}); rollout score "
                         f"{r['first_score']['mean']:.3f} over the first {WINDOW} iterations, "
                         f"{r['last_score']['mean']:.3f} over the last {WINDOW}; training loop "
                         f"{r['train_seconds']['mean']:.0f} s per run (median iteration "
                         f"{r['iteration_seconds']['mean']:.2f} s).")
    side = result.get("side_by_side")
    if side:
        ppo = side["ppo"]
        lines += ["", f"Side by side, {side['ppo']['iterations']} iterations each, 128 responses per iteration, run one "
                  "after the other (median iteration after the first; peak resident memory of the process):", "",
                  "| method | s / iteration | vs PPO | peak RSS MB | vs PPO |", "|---|---:|---:|---:|---:|"]
        for key, arm in side.items():
            lines.append(f"| {key.upper()} | {arm['median_iteration_seconds']:.2f} | "
                         f"{arm['median_iteration_seconds'] / ppo['median_iteration_seconds']:.2f}x | "
                         f"{arm['peak_rss_mb']:.0f} | {arm['peak_rss_mb'] / ppo['peak_rss_mb']:.2f}x |")
        lines += ["", "GRPO and RLOO do the same work per iteration (their advantages differ by a line of arithmetic): "
                  "the gap between their times is the shared machine's load, a measure of how loose these times are."]
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if args.sft:
        sft_dir = Path(args.sft).resolve()
    else:
        sft_dir = runs / "sft"
        recipe("sft", ["--config", str(CONFIGS / "sft_lora.yaml"), "--output_dir", str(sft_dir), "--overwrite"],
               runs / "sft.log", args.reuse)
    sft = json.loads((sft_dir / "summary.json").read_text())
    print(f"SFT: verifier accuracy {sft['eval_accuracy']:.3f}", flush=True)

    result: dict = {"device": "cpu", "date": time.strftime("%Y-%m-%d"), "seeds": args.seeds,
                    "eval_prompts": 8 if args.smoke else 200, "sft_run": str(sft_dir),
                    "sft": {"eval_accuracy": sft["eval_accuracy"]}, "machine": "2 CPU cores shared with other jobs"}
    loop = RESULTS / "loop_accuracy_cpu.json"
    if loop.is_file() and not args.smoke:
        result["ppo_reference"] = json.loads(loop.read_text())["ppo"]["eval_accuracy"]
    for method in args.methods:
        summaries = []
        for seed in args.seeds:
            summaries.append(accuracy_run(method, sft_dir, runs / f"{method}-seed{seed}", seed, args.smoke, args.reuse))
            r = summaries[-1]
            print(f"{method.upper()} seed {seed}: {r['init_eval_accuracy']:.3f} -> {r['eval_accuracy']:.3f} (final KL "
                  f"{r['final_kl']:.3f}, score {r['first_score']:.3f} -> {r['last_score']:.3f})", flush=True)
        result[method] = {key: stats([s[key] for s in summaries])
                          for key in ("eval_accuracy", "final_kl", "max_kl", "first_score", "last_score",
                                      "iteration_seconds", "train_seconds")}
        result[method]["iterations"] = summaries[0]["iterations"]
    if args.side_iterations:
        result["side_by_side"] = {}
        for method in SIDE:
            result["side_by_side"][method] = side_run(method, sft_dir, runs / f"side-{method}", args.side_iterations)
            print(f"side by side {method}: {result['side_by_side'][method]['median_iteration_seconds']:.2f} s per "
                  f"iteration, peak {result['side_by_side'][method]['peak_rss_mb']:.0f} MB", flush=True)
    text = table(result)
    write_report(RESULTS / f"grpo_accuracy_cpu{'_smoke' if args.smoke else ''}.json", result, text)
    print(text)


if __name__ == "__main__":
    main()
