"""The pipeline's reward refresh on a reduced budget (tiny model, a few steps per stage, one DPO run a round): each
round trains a reward model on the reward config's pairs plus every earlier round's own pairs, rejection sampling
scores with that round's reward model, and the gate decides on its win rate."""

import json
from pathlib import Path

import pytest
import recipe_runs
from factories import PIPELINE_QUICK

from finetune.config import PipelineRunConfig
from finetune.data import load_preferences
from finetune.pipeline import sign_test_p

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG_PAIRS = 8
REWARD = ("--reward.overrides=[--train.max_steps=2, --train.per_device_batch_size=4, --train.logging_steps=1, "
          f"--train.save_steps=2, --data.max_train_samples={CONFIG_PAIRS}, --data.max_eval_samples=4]")


def read(path):
    return json.loads(Path(path).read_text())


def pair_key(pair):
    return json.dumps([pair.prompt, pair.chosen, pair.rejected])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "reward"
    argv = ["--output_dir", str(out), *PIPELINE_QUICK, "--reward.enabled=true", REWARD, "--gate.metric=win_rate",
            "--average.runs=1", "--rounds=2"]
    assert recipe_runs.run_recipe("pipeline", PipelineRunConfig, argv) == 0
    return out


def test_round_two_trains_its_reward_model_on_the_configs_pairs_and_round_ones(pipeline):
    config_pairs = [pair_key(p) for p in load_preferences("bundled:suite_preference_train.jsonl", limit=CONFIG_PAIRS)]
    round_one = [pair_key(p) for p in load_preferences(str(pipeline / "round-1" / "rejection_sampling" / "pairs.jsonl"))]
    assert round_one, "round 1 wrote no pairs: nothing to gather"
    gathered = {n: [pair_key(p) for p in load_preferences(str(pipeline / f"round-{n}" / "reward_pairs.jsonl"))]
                for n in (1, 2)}
    assert gathered[1] == config_pairs
    assert gathered[2] == config_pairs + round_one and len(gathered[2]) == CONFIG_PAIRS + len(round_one)
    for n in (1, 2):
        reward = pipeline / f"round-{n}" / "reward"
        assert read(reward / "run.json")["status"] == "finished"
        # The reward stage reads the gathered file whole: its own max_train_samples chose the config's pairs only.
        assert read(reward / "summary.json")["train_data"]["records"] == len(gathered[n])
        manifest = read(pipeline / f"round-{n}" / "manifest.json")
        assert manifest["inputs"]["reward_pairs"] == str(pipeline / f"round-{n}" / "reward_pairs.jsonl")
        assert manifest["stages"]["reward"]["run_dir"] == str(reward)


def test_rejection_sampling_scores_with_its_rounds_reward_model(pipeline):
    from finetune.config import RejectionSamplingRunConfig, load_yaml

    for n in (1, 2):
        rs = pipeline / f"round-{n}" / "rejection_sampling"
        cfg = load_yaml(RejectionSamplingRunConfig, rs / "config.yaml")
        assert cfg.score.reward_model == str(pipeline / f"round-{n}" / "reward")
        rows = [json.loads(line) for line in (rs / "samples.jsonl").read_text().splitlines()]
        assert rows and all(f"reward_model:{cfg.score.reward_model}" in row["scores"] for row in rows)


def test_the_gate_decides_on_the_reward_models_win_rate(pipeline):
    for n in (1, 2):
        manifest = read(pipeline / f"round-{n}" / "manifest.json")
        rate = manifest["figures"]["candidate"]["win_rate"]
        assert 0 <= rate <= 1 and manifest["gate"]["metric"] == "win_rate"
        assert manifest["reason"].startswith(f"win rate {rate:.3f} against the incumbent")
        # The sign test (gate.max_p_value 0.05) counts the same per-prompt comparisons the win rate averages.
        candidate = manifest["figures"]["candidate"]
        better, worse, prompts = candidate["prompts_better"], candidate["prompts_worse"], candidate["num_prompts"]
        assert rate == pytest.approx((better + 0.5 * (prompts - better - worse)) / prompts)
        assert manifest["promoted"] == (rate > 0.5 and sign_test_p(better, worse) <= 0.05)
    assert read(pipeline / "run.json")["status"] == "finished"
