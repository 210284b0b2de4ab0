"""Verifier accuracy on the bundled suite after DPO, KTO, ORPO and SimPO, all from one SFT run, over seeds.

    python benchmarks/preference_accuracy.py --sft runs/sft            # 4 methods x seeds 0 1 2 (2 CPU cores: ~20 min)
    python benchmarks/preference_accuracy.py                           # trains the SFT run first (sft_lora.yaml)
    python benchmarks/preference_accuracy.py --sft runs/sft --methods kto simpo --seeds 0
    python benchmarks/preference_accuracy.py --smoke                   # every step end to end in minutes

Every run is the shipped recipe with its shipped tiny config (``recipes/configs/tiny/dpo_lora.yaml``,
``kto_lora.yaml``, ``dpo_orpo_lora.yaml``, ``dpo_simpo_lora.yaml``), all from the same SFT run, with the same budget
overrides for every method (``BUDGET``: the first ``--train-pairs`` training pairs, one epoch; no verifier pass before
training, the SFT run's own figure is the baseline) and only ``--train.seed`` changed between seeds. KTO reads the
same pairs, each split into a desirable and an undesirable example, with twice the rows per micro-batch, so every
method sees the same sequences per optimizer step. Accuracy is the fraction of the held-out suite prompts whose
greedy answer the verifier accepts. Results: ``benchmarks/results/preference_accuracy_cpu.json`` and ``.md``
(``--smoke``: ``*_smoke.*``, not figures); the runs stay under ``--runs`` (default ``runs/bench-preference``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loop_accuracy import recipe, stats
from report import write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = ROOT / "recipes" / "configs" / "tiny"
# method -> (recipe, shipped tiny config, what the table calls it)
METHODS = {
    "dpo": ("dpo", "dpo_lora.yaml", "DPO (`dpo_lora.yaml`: sigmoid + 0.2 NLL, reference = SFT)"),
    "kto": ("kto", "kto_lora.yaml", "KTO (`kto_lora.yaml`: pairs split, reference = SFT)"),
    "orpo": ("dpo", "dpo_orpo_lora.yaml", "ORPO (`dpo_orpo_lora.yaml`: no reference)"),
    "simpo": ("dpo", "dpo_simpo_lora.yaml", "SimPO (`dpo_simpo_lora.yaml`: no reference)"),
}
EVAL_PROMPTS, SMOKE_EVAL_PROMPTS = 200, 8
TRAIN_PAIRS, SMOKE_TRAIN_PAIRS = 512, 16


def budget(train_pairs: int, smoke: bool) -> list[str]:
    """The overrides every method's run gets, so all four train on the same pairs for the same steps."""
    args = [f"--data.max_train_samples={train_pairs}", "--train.num_epochs=1", "--eval.before_training=false",
            "--train.save_steps=100000"]  # no checkpoint to write: nothing here resumes
    if smoke:
        args += ["--train.max_steps=2", f"--data.max_eval_samples={SMOKE_EVAL_PROMPTS}",
                 f"--eval.num_samples={SMOKE_EVAL_PROMPTS}", "--eval.max_new_tokens=8"]
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--sft", help="an existing SFT run to start from (default: train one with sft_lora.yaml)")
    parser.add_argument("--runs", help="where the runs go (default runs/bench-preference[-smoke])")
    parser.add_argument("--train-pairs", type=int, help=f"training pairs per run (default {TRAIN_PAIRS})")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs under --runs instead of rerunning")
    parser.add_argument("--smoke", action="store_true", help="two steps and a few prompts per run; results *_smoke.*")
    args = parser.parse_args(argv)
    args.methods = [m for m in METHODS if m in args.methods]
    if args.train_pairs is None:
        args.train_pairs = SMOKE_TRAIN_PAIRS if args.smoke else TRAIN_PAIRS
    if args.runs is None:
        args.runs = str(ROOT / "runs" / ("bench-preference-smoke" if args.smoke else "bench-preference"))
    return args


def run_args(method: str, out: Path, sft: Path, seed: int, train_pairs: int, smoke: bool) -> list[str]:
    _, config, _ = METHODS[method]
    return ["--config", str(CONFIGS / config), "--init", str(sft), "--output_dir", str(out), "--overwrite",
            f"--train.seed={seed}", *budget(train_pairs, smoke)]


def summarise(sft: dict, sft_run: str, seeds: list[int], eval_prompts: int, train_pairs: int,
              runs: dict[str, list[dict]]) -> dict:
    result = {"device": "cpu", "seeds": seeds, "eval_prompts": eval_prompts, "train_pairs": train_pairs,
              "sft_run": sft_run, "sft": {"eval_accuracy": sft["eval_accuracy"]}, "methods": list(runs)}
    for method, summaries in runs.items():
        entry = {"eval_accuracy": stats([s["eval_accuracy"] for s in summaries]),
                 "train_loss": stats([s["train_loss"] for s in summaries]),
                 "steps": [s.get("global_step") for s in summaries],
                 "wall_seconds": [s.get("wall_seconds") for s in summaries]}
        if method != "kto":
            entry["eval_reward_accuracy"] = stats([s["eval_reward_accuracy"] for s in summaries])
        if method == "dpo":
            entry["eval_kl_gap"] = stats([s["eval_kl_gap"] for s in summaries])
        if method == "kto":
            entry["eval_kl"] = stats([s["eval_kl"] for s in summaries])
            entry["eval_reward_margin"] = stats([s["eval_reward_margin"] for s in summaries])
        result[method] = entry
    return result


def table(result: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    seeds = ", ".join(str(s) for s in result["seeds"])
    lines = [
        f"Verifier accuracy on the {result['eval_prompts']} held-out suite prompts (greedy answers), tiny LLaMA, CPU, "
        f"seeds {seeds}; every method from the same SFT run, on the first {result['train_pairs']} bundled training "
        "pairs for one epoch",
        "",
        "| model | accuracy per seed | mean | spread (max - min) | held-out pairs' reward accuracy (mean) |",
        "|---|---|---:|---:|---:|",
        f"| SFT (the `--init` run) | {pct(result['sft']['eval_accuracy'])} | {pct(result['sft']['eval_accuracy'])} "
        "| - | - |",
    ]
    for method in result["methods"]:
        entry, name = result[method], METHODS[method][2]
        acc = entry["eval_accuracy"]
        reward = f"{entry['eval_reward_accuracy']['mean']:.3f}" if "eval_reward_accuracy" in entry else "- (unpaired)"
        lines.append(f"| {name} | {', '.join(pct(v) for v in acc['values'])} | {pct(acc['mean'])} | "
                     f"{pct(acc['spread'])} | {reward} |")
    lines.append("")
    lines.append("Reward accuracy is the fraction of the held-out pairs whose chosen reply scores above the rejected one: "
                 "for DPO by its implicit reward (log-ratio to the reference), for ORPO and SimPO by the mean per-token "
                 "log-likelihood (they have no reference); KTO's examples are unpaired.")
    if "dpo" in result:
        lines.append(f"DPO: kl_gap to the reference {result['dpo']['eval_kl_gap']['mean']:.2f} nats per reply.")
    if "kto" in result:
        kto = result["kto"]
        lines.append(f"KTO: reference point z0 (KL estimate) {kto['eval_kl']['mean']:.3f} nats, desirable minus "
                     f"undesirable reward {kto['eval_reward_margin']['mean']:.3f} on the held-out examples.")
    seconds = {m: result[m]["wall_seconds"] for m in result["methods"] if all(result[m]["wall_seconds"])}
    if "dpo" in seconds and len(seconds) > 1:
        base = sum(seconds["dpo"]) / len(seconds["dpo"])
        ratios = ", ".join(f"{m} {sum(s) / len(s) / base:.2f}x" for m, s in seconds.items() if m != "dpo")
        lines.append(f"Wall time per run against DPO's, measured in this one run on a shared 2-core machine (other "
                     f"jobs ran beside it, so ratios only): {ratios}.")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    runs_dir = Path(args.runs)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if args.sft:
        sft_dir = Path(args.sft)
        sft = json.loads((sft_dir / "summary.json").read_text())
    else:
        sft_dir = runs_dir / "sft"
        sft_args = ["--config", str(CONFIGS / "sft_lora.yaml"), "--output_dir", str(sft_dir), "--overwrite"]
        if args.smoke:
            sft_args += ["--train.max_steps=2", "--data.max_train_samples=16", *budget(0, True)[-3:]]
        sft = recipe("sft", sft_args, runs_dir / "sft.log", args.reuse)
    print(f"SFT: verifier accuracy {sft['eval_accuracy']:.3f}", flush=True)

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        for method in args.methods:
            out = runs_dir / f"{method}-seed{seed}"
            summary = recipe(METHODS[method][0], run_args(method, out, sft_dir, seed, args.train_pairs, args.smoke),
                             runs_dir / f"{method}-seed{seed}.log", args.reuse)
            summary["global_step"] = _last_step(out)
            results[method].append(summary)
            print(f"{method} seed {seed}: verifier accuracy {summary['eval_accuracy']:.3f} "
                  f"({summary['global_step']} steps, {summary.get('wall_seconds', 0):.0f} s)", flush=True)

    eval_prompts = SMOKE_EVAL_PROMPTS if args.smoke else EVAL_PROMPTS
    result = summarise(sft, str(sft_dir), args.seeds, eval_prompts, args.train_pairs, results)
    text = table(result)
    write_report(RESULTS / f"preference_accuracy_cpu{'_smoke' if args.smoke else ''}.json", result, text)
    print(text)


def _last_step(out: Path) -> int | None:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "step" in r]
    return max(steps) if steps else None


if __name__ == "__main__":
    sys.exit(main())
