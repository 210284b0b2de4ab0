"""Every model of the pipeline benchmark's runs, measured on the suite's 2,000-prompt test set.

    python benchmarks/pipeline_test_set.py                      # after loop_accuracy.py --pipeline; ~10 core-min
    python benchmarks/pipeline_test_set.py --seeds 0            # one seed (side by side with --seeds 1 2), then all

``loop_accuracy.py --pipeline`` reports the 200 held-out prompts the pipeline's gate decides on: one prompt is 0.5
points and the promoted models are selected on them. ``suite_messages_test.jsonl`` holds 2,000 word lists to sort
or reverse that no split, no pretraining document and no gate has seen (the only families with prompts left), so
the same models are measured here on ten times the prompts, greedy answers, the suite's verifier. Each model's
figure is cached under ``RUNS/test-figures/``; results go to ``benchmarks/results/pipeline_test_set_cpu.json`` and
``.md``, with each paired step of a round (per seed gains) and whether it held by more than the seeds' spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
TEST_DATA = "bundled:suite_messages_test.jsonl"
TEST_GATE = SimpleNamespace(data=TEST_DATA, split=None, max_samples=None, verifier="finetune.suite:verify",
                            max_new_tokens=32, batch_size=32)


def models(runs: Path, seed: int) -> dict[str, Path]:
    """Row name -> run directory, for one seed's runs of ``loop_accuracy.py --pipeline``."""
    found = {"SFT on the seed set (start)": runs / "sft", "SFT on all the answers (reference)": runs / "sft-all",
             "DPO on the bundled pairs": runs / f"dpo-seed{seed}"}
    for n in (1, 2):
        rnd = runs / f"pipeline-seed{seed}" / f"round-{n}"
        found[f"round {n}: rejection sampling + SFT"] = rnd / "rejection_sampling" / "sft"
        for i, run in enumerate(sorted((rnd / "dpo").glob("seed-*")), 1):
            found[f"round {n}: DPO run {i}"] = run
        found[f"round {n}: average"] = rnd / "average"
    for run in sorted((runs / f"llama2-seed{seed}" / "round-1" / "ppo").glob("seed-*")):
        found["Llama 2 round 1: PPO"] = run
    return found


def accuracy(run: Path, cache: Path) -> float:
    """Test-set accuracy of one run directory, measured once and cached by its path."""
    path = cache / (str(run.resolve().relative_to(ROOT)).replace("/", "__") + ".json")
    if path.is_file():
        return json.loads(path.read_text())["accuracy"]
    from finetune.pipeline import atomic_write_text, measure

    figures = measure(run, TEST_GATE)
    cache.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"model": str(run), "accuracy": figures["accuracy"],
                                        "num_prompts": figures["num_prompts"]}) + "\n")
    return figures["accuracy"]


def step(name: str, a: list[float], b: list[float]) -> dict:
    """Row ``a`` against row ``b`` over seeds: each seed's gain, and whether the gap of the means beats the larger
    spread (max - min), as ``loop_accuracy.py`` judges its orderings."""
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    spread = max(max(a) - min(a), max(b) - min(b))
    gap = mean(a) - mean(b)
    return {"step": name, "gap": gap, "spread": spread, "held": gap > spread,
            "per_seed": [x - y for x, y in zip(a, b)]}


STEPS = [
    ("SFT on the seed set -> round 1 rejection sampling", "round 1: rejection sampling + SFT", "SFT on the seed set (start)"),
    ("round 1 rejection sampling -> its DPO (mean of the runs)", "round 1: DPO", "round 1: rejection sampling + SFT"),
    ("round 1 DPO (mean of the runs) -> their average", "round 1: average", "round 1: DPO"),
    ("round 1 -> round 2 (averages)", "round 2: average", "round 1: average"),
    ("round 2 rejection sampling over its start", "round 2: rejection sampling + SFT", "round 1: average"),
    ("round 2 rejection sampling -> its DPO (mean of the runs)", "round 2: DPO", "round 2: rejection sampling + SFT"),
    ("round 2 DPO (mean of the runs) -> their average", "round 2: average", "round 2: DPO"),
    ("round 1 rejection sampling -> Llama 2 PPO", "Llama 2 round 1: PPO", "round 1: rejection sampling + SFT"),
]


def result(per_seed: dict[int, dict[str, float]]) -> dict:
    """Rows by seed (with each round's DPO runs also as their mean, ``round N: DPO``) and the paired steps."""
    for figures in per_seed.values():
        for n in (1, 2):
            runs = [v for k, v in figures.items() if k.startswith(f"round {n}: DPO run")]
            if runs:
                figures[f"round {n}: DPO"] = sum(runs) / len(runs)
    seeds = sorted(per_seed)
    names = [k for k in per_seed[seeds[0]] if all(k in per_seed[s] for s in seeds)]
    rows = {k: [per_seed[s][k] for s in seeds] for k in names}
    steps = [step(label, rows[a], rows[b]) for label, a, b in STEPS if a in rows and b in rows]
    return {"device": "cpu", "data": TEST_DATA, "seeds": seeds, "rows": rows, "steps": steps}


def table(res: dict) -> str:
    pct = lambda v: f"{100 * sum(v) / len(v):.2f}%"  # noqa: E731
    seeds = ", ".join(str(s) for s in res["seeds"])
    lines = [f"Verifier accuracy on the suite's 2,000 test prompts (new word lists to sort or reverse; greedy answers), "
             f"the models of `loop_accuracy.py --pipeline`, seeds {seeds}.", "",
             "| model | mean | per seed |", "|---|---:|---|"]
    lines += [f"| {k} | {pct(v)} | {', '.join(f'{100 * x:.2f}' for x in v)} |" for k, v in res["rows"].items()]
    lines += ["", "| step | gap of the means | spread | held | per seed |", "|---|---:|---:|---|---|"]
    lines += [f"| {s['step']} | {100 * s['gap']:+.2f} | {100 * s['spread']:.2f} | {'yes' if s['held'] else 'no'} | "
              f"{', '.join(f'{100 * g:+.2f}' for g in s['per_seed'])} |" for s in res["steps"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bench-pipeline"),
                        help="loop_accuracy.py --pipeline's runs (default runs/bench-pipeline)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = Path(args.runs)
    per_seed = {seed: {name: accuracy(run, runs / "test-figures") for name, run in models(runs, seed).items()}
                for seed in args.seeds}
    res = result(per_seed)
    text = table(res)
    write_report(RESULTS / "pipeline_test_set_cpu.json", res, text)
    print(text)


if __name__ == "__main__":
    main()
