"""benchmarks/preference_accuracy.py's pure parts: the runs it launches (one budget for every method) and its table,
on fake summaries."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbours by name
    spec = importlib.util.spec_from_file_location("bench_preference_accuracy", BENCHMARKS / "preference_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_every_method_gets_its_shipped_config_and_the_same_budget(bench, tmp_path):
    args = bench.parse_args(["--methods", "simpo", "dpo", "--sft", "runs/sft"])
    assert args.methods == ["dpo", "simpo"] and args.train_pairs == bench.TRAIN_PAIRS and args.seeds == [0, 1, 2]
    runs = {m: bench.run_args(m, tmp_path / m, tmp_path / "sft", 1, 512, False) for m in bench.METHODS}
    for method, argv in runs.items():
        assert argv[1] == str(bench.CONFIGS / bench.METHODS[method][1]) and (bench.CONFIGS / argv[1]).is_file()
        assert argv[argv.index("--init") + 1] == str(tmp_path / "sft") and "--train.seed=1" in argv
        assert argv[-len(bench.budget(512, False)):] == bench.budget(512, False)  # last, so they win
    assert "--data.max_train_samples=512" in runs["kto"]
    assert bench.parse_args(["--smoke"]).train_pairs == bench.SMOKE_TRAIN_PAIRS


def test_table_and_ratios(bench):
    def run(acc, **extra):
        return {"eval_accuracy": acc, "train_loss": 0.5, "global_step": 128, "wall_seconds": 100.0, **extra}

    runs = {
        "dpo": [run(a, eval_reward_accuracy=0.9, eval_kl_gap=-1.0) for a in (0.80, 0.79, 0.81)],
        "kto": [dict(run(a, eval_kl=0.01, eval_reward_margin=0.3), wall_seconds=150.0) for a in (0.82, 0.84, 0.83)],
    }
    result = bench.summarise({"eval_accuracy": 0.835}, "runs/sft", [0, 1, 2], 200, 512, runs)
    assert result["kto"]["eval_accuracy"]["mean"] == pytest.approx(0.83)
    text = bench.table(result)
    assert "| SFT (the `--init` run) | 83.5% | 83.5% | - | - |" in text
    assert "| 80.0%, 79.0%, 81.0% | 80.0% | 2.0% | 0.900 |" in text
    assert "| 82.0%, 84.0%, 83.0% | 83.0% | 2.0% | - (unpaired) |" in text
    assert "kto 1.50x" in text and "| ORPO" not in text  # methods that did not run have no row
