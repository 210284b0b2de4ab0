"""benchmarks/grpo_accuracy.py's pure parts on fake runs: arguments, PPO's iteration time from its metrics, and the
results table (milliseconds; the benchmark itself is ``python benchmarks/grpo_accuracy.py``)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its neighbours (loop_accuracy, report) by name
    spec = importlib.util.spec_from_file_location("bench_grpo_accuracy", BENCHMARKS / "grpo_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_arguments_and_the_shipped_configs(bench):
    args = bench.parse_args([])
    assert args.methods == ["grpo", "rloo"] and args.seeds == [0, 1, 2] and args.runs.endswith("bench-grpo")
    assert bench.parse_args(["--smoke"]).side_iterations == 2
    for _, config in bench.SIDE.values():
        assert (bench.CONFIGS / config).is_file()


def test_iteration_seconds_of_ppo_rows_come_from_tokens_per_second(bench):
    """PPO logs response tokens per second of the whole iteration: 128 responses of 4 tokens at 256 tokens/s took
    2 s; GRPO logs the seconds themselves."""
    assert bench.iteration_seconds([{"response_length": 4.0, "tokens_per_second": 256.0},
                                    {"iteration_seconds": 1.5}], 128) == [2.0, 1.5]


def test_table_shows_each_method_against_sft_ppo_and_side_by_side(bench):
    def s(*values):
        return bench.stats(list(values))

    arm = {"eval_accuracy": s(0.84, 0.85, 0.845), "final_kl": s(0.1, 0.2, 0.3), "max_kl": s(0.2, 0.4, 0.3),
           "first_score": s(0.6, 0.6, 0.6), "last_score": s(0.7, 0.7, 0.7), "iterations": 60,
           "train_seconds": s(100.0, 110.0, 120.0), "iteration_seconds": s(2.0, 2.0, 2.0)}
    result = {"date": "2026-12-02", "seeds": [0, 1, 2], "eval_prompts": 200, "sft": {"eval_accuracy": 0.835},
              "ppo_reference": s(0.845, 0.845, 0.85), "grpo": arm, "rloo": arm,
              "side_by_side": {"ppo": {"iterations": 6, "median_iteration_seconds": 4.0, "peak_rss_mb": 800.0},
                               "grpo": {"iterations": 6, "median_iteration_seconds": 3.0, "peak_rss_mb": 760.0},
                               "rloo": {"iterations": 6, "median_iteration_seconds": 3.0, "peak_rss_mb": 760.0}}}
    text = bench.table(result)
    assert "| SFT (`sft_lora.yaml`, one run) | 83.5% | 83.5% | - |" in text
    assert "| GRPO (`grpo_lora.yaml`), 60 iterations | 84.0%, 85.0%, 84.5% | 84.5% | 1.0% |" in text
    assert "84.5%, 84.5%, 85.0%" in text and "shared 2-core machine" in text
    assert "| GRPO | 3.00 | 0.75x | 760 | 0.95x |" in text
    assert "training loop 110 s per run (median iteration 2.00 s)" in text
