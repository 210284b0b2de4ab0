"""Verifier accuracy on the bundled suite: the SFT model, rejection sampling and PPO from it, over several seeds.

    python benchmarks/rl_accuracy.py                        # SFT once, then RS and PPO for seeds 0 1 2 (CPU: ~1 h)
    python benchmarks/rl_accuracy.py --sft runs/sft --seeds 0 1 2

Every run is the shipped recipe with the shipped tiny config (``recipes/configs/tiny/sft_lora.yaml``,
``rejection_sampling.yaml``, ``ppo_lora.yaml``), the suite's verifier as the score / reward, and only the seeds
changed: ``--sampling.seed`` and ``--train.seed`` (RS), ``--sampling.seed`` and ``--ppo.seed`` (PPO). Accuracy is
the fraction of the 200 held-out suite prompts whose greedy answer the verifier accepts. Reported per method: each
seed's accuracy, the mean, the spread (max - min) and, for PPO, the KL to the reference at the last iteration and
its largest value over the run. Results go to ``benchmarks/results/rl_accuracy_cpu.json`` and ``.md``; the runs
stay under ``--runs`` (default ``runs/bench-rl``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "recipes" / "configs" / "tiny"


def recipe(name: str, args: list[str], log: Path, reuse: bool = False) -> dict:
    """Run ``recipes/NAME.py`` in one process (OMP_NUM_THREADS=1), its output in ``log``; returns its summary. With
    ``reuse``, a run whose ``summary.json`` exists (it finished) is read instead of run again."""
    out = Path(args[args.index("--output_dir") + 1])
    if reuse and (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{name}.py"), *args], env=env, cwd=ROOT,
                              stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"recipes/{name}.py failed (exit {proc.returncode}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - started
    return summary


def stats(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    return {"values": values, "mean": mean, "spread": max(values) - min(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sft", help="an existing SFT run to start from (default: train one with sft_lora.yaml)")
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-rl"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --runs instead of rerunning")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)

    if args.sft:
        sft_dir = Path(args.sft)
        sft = json.loads((sft_dir / "summary.json").read_text())
    else:
        sft_dir = runs / "sft"
        sft = recipe("sft", ["--config", str(CONFIGS / "sft_lora.yaml"), "--output_dir", str(sft_dir), "--overwrite"],
                     runs / "sft.log", args.reuse)
    print(f"SFT: verifier accuracy {sft['eval_accuracy']:.3f}", flush=True)

    rs, ppo = [], []
    for seed in args.seeds:
        rs.append(recipe("rejection_sampling", [
            "--config", str(CONFIGS / "rejection_sampling.yaml"), "--init", str(sft_dir),
            "--output_dir", str(runs / f"rs-seed{seed}"), "--overwrite",
            f"--sampling.seed={seed}", f"--train.seed={seed}",
        ], runs / f"rs-seed{seed}.log", args.reuse))
        print(f"RS seed {seed}: {rs[-1]['init_eval_accuracy']:.3f} -> {rs[-1]['eval_accuracy']:.3f} "
              f"(mean score all {rs[-1]['mean_score_all']:.3f}, kept {rs[-1]['mean_score_kept']:.3f}, "
              f"{rs[-1]['kept_samples']} kept, {rs[-1]['prompts_kept_nothing']} prompts kept nothing)", flush=True)
        out = runs / f"ppo-seed{seed}"
        ppo.append(recipe("ppo", [
            "--config", str(CONFIGS / "ppo_lora.yaml"), "--init", str(sft_dir), "--output_dir", str(out),
            "--overwrite", f"--sampling.seed={seed}", f"--ppo.seed={seed}",
        ], runs / f"ppo-seed{seed}.log", args.reuse))
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        ppo[-1]["max_kl"] = max(m["kl"] for m in metrics)
        ppo[-1]["first_score"] = metrics[0]["score"]
        print(f"PPO seed {seed}: {ppo[-1]['init_eval_accuracy']:.3f} -> {ppo[-1]['eval_accuracy']:.3f} "
              f"(final KL {ppo[-1]['final_kl']:.2f}, max KL {ppo[-1]['max_kl']:.2f})", flush=True)

    result = {
        "device": "cpu",
        "seeds": args.seeds,
        "eval_prompts": 200,
        "sft_run": str(sft_dir),
        "sft": {"eval_accuracy": sft["eval_accuracy"]},
        "rejection_sampling": {
            "eval_accuracy": stats([r["eval_accuracy"] for r in rs]),
            "mean_score_all": stats([r["mean_score_all"] for r in rs]),
            "mean_score_kept": stats([r["mean_score_kept"] for r in rs]),
            "kept_samples": [r["kept_samples"] for r in rs],
            "prompts_kept_nothing": [r["prompts_kept_nothing"] for r in rs],
            "wall_seconds": [r.get("wall_seconds") for r in rs],
        },
        "ppo": {
            "eval_accuracy": stats([r["eval_accuracy"] for r in ppo]),
            "final_kl": stats([r["final_kl"] for r in ppo]),
            "max_kl": stats([r["max_kl"] for r in ppo]),
            "final_score": stats([r["final_score"] for r in ppo]),
            "first_score": stats([r["first_score"] for r in ppo]),
            "wall_seconds": [r.get("wall_seconds") for r in ppo],
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "rl_accuracy_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    (RESULTS / "rl_accuracy_cpu.md").write_text(text + "\n")
    print(text)


def table(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    rs, ppo = result["rejection_sampling"], result["ppo"]
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        f"Verifier accuracy on the {result['eval_prompts']} held-out suite prompts (greedy answers), tiny LLaMA, "
        f"CPU, seeds {seeds}",
        "",
        "| model | accuracy per seed | mean | spread (max - min) |",
        "|---|---|---:|---:|",
        f"| SFT (`sft_lora.yaml`, one run) | {pct(result['sft']['eval_accuracy'])} | "
        f"{pct(result['sft']['eval_accuracy'])} | - |",
    ]
    for name, block in (("rejection sampling (`rejection_sampling.yaml`)", rs), ("PPO (`ppo_lora.yaml`)", ppo)):
        acc = block["eval_accuracy"]
        lines.append(f"| {name} | {', '.join(pct(v) for v in acc['values'])} | {pct(acc['mean'])} | "
                     f"{pct(acc['spread'])} |")
    lines += [
        "",
        f"Rejection sampling: mean score of all samples {rs['mean_score_all']['mean']:.3f}, of the kept ones "
        f"{rs['mean_score_kept']['mean']:.3f}; kept {rs['kept_samples']} samples, prompts that kept nothing "
        f"{rs['prompts_kept_nothing']}.",
        f"PPO: KL to the reference at the last iteration {ppo['final_kl']['mean']:.2f} nats per response (largest over "
        f"the runs {ppo['max_kl']['max']:.2f}); rollout score {ppo['first_score']['mean']:.3f} at the first iteration, "
        f"{ppo['final_score']['mean']:.3f} at the last.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
