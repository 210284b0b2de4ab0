"""How long a person waits for ``--help``: ``finetune --help``, ``finetune sft --help``, a recipe's ``--help`` on its
own and under ``accelerate launch`` (bare, which prints accelerate's defaults warning, and with
``--config_file accelerate_configs/single_gpu.yaml``, which does not), optionally against another checkout (the
code before a change), each command run in turn, round after round, so a shared machine's load falls on all alike.

    python benchmarks/cli_startup.py                           # this checkout
    python benchmarks/cli_startup.py --before /path/to/older/checkout --rounds 5

Writes benchmarks/results/cli_startup.json and .md: the median wall time of each command, whether it wrote anything
to stderr (a warning), and the ratio to the older checkout where one is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import write_report

ROOT = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).with_name("accelerate")

COMMANDS = {
    "finetune --help": [sys.executable, "-m", "finetune.cli", "--help"],
    "finetune sft --help": [sys.executable, "-m", "finetune.cli", "sft", "--help"],
    "python recipes/sft.py --help": [sys.executable, "recipes/sft.py", "--help"],
    "accelerate launch recipes/sft.py --help": [str(ACCELERATE), "launch", "recipes/sft.py", "--help"],
    "accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/sft.py --help": [
        str(ACCELERATE), "launch", "--config_file", "accelerate_configs/single_gpu.yaml", "recipes/sft.py", "--help"],
}


def time_once(command: list[str], checkout: Path) -> tuple[float, str]:
    """Wall seconds of ``command`` run in ``checkout`` (its code first on the path), and what it wrote to stderr."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} in {checkout} exited {result.returncode}: {result.stderr[-500:]}")
    return seconds, result.stderr


def measure(checkouts: dict[str, Path], rounds: int) -> dict:
    times: dict = {name: {label: [] for label in COMMANDS} for name in checkouts}
    stderr: dict = {name: {} for name in checkouts}
    for _ in range(rounds):
        for label, command in COMMANDS.items():
            for name, checkout in checkouts.items():
                seconds, err = time_once(command, checkout)
                times[name][label].append(seconds)
                stderr[name][label] = err.strip().splitlines()[0] if err.strip() else ""
    return {name: {label: {"median_s": statistics.median(values), "runs_s": values,
                           "stderr_first_line": stderr[name][label]}
                   for label, values in by_label.items()} for name, by_label in times.items()}


def table(results: dict, rounds: int) -> str:
    names = list(results)
    head = "| command | " + " | ".join(f"{n} s (median)" for n in names)
    head += " | after / before |" if len(names) == 2 else " |"
    head += " stderr (after) |"
    lines = [f"`--help` start-up, median of {rounds} rounds, commands interleaved; {os.cpu_count()} CPU cores, "
             "machine shared with other jobs (compare within a row, not across machines)", "", head,
             "|---|" + "---:|" * (len(names) + (1 if len(names) == 2 else 0)) + "---|"]
    after = names[-1]
    for label in COMMANDS:
        cells = [f"{results[n][label]['median_s']:.2f}" for n in names]
        if len(names) == 2:
            cells.append(f"{results[after][label]['median_s'] / results[names[0]][label]['median_s']:.2f}")
        warning = results[after][label]["stderr_first_line"] or "nothing"
        lines.append(f"| `{label}` | " + " | ".join(cells) + f" | {warning[:70]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, default=None, help="an older checkout to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cli_startup.json")
    args = parser.parse_args(argv)
    checkouts = ({"before": args.before.resolve()} if args.before else {}) | {"after": ROOT}
    results = measure(checkouts, args.rounds)
    text = table(results, args.rounds)
    write_report(args.out, {"rounds": args.rounds, "results": results}, text)
    print(text)


if __name__ == "__main__":
    main()
