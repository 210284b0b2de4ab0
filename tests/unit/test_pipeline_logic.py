"""The pipeline's pure parts: the gate's decision and its reason, win rates, what --resume does with a stage's
directory, the seeds, the summary table, and the config's checks."""

import json

import pytest

from finetune.config import ConfigError, PipelineRunConfig, parse_args
from finetune.pipeline import (
    GATHERED_PAIRS_DATA,
    ROUND_PAIRS_DATA,
    averaged_directories,
    check_stage_configs,
    final_model_lines,
    gate_decision,
    last_checkpoints,
    paired_counts,
    sign_test_p,
    stage_config,
    stage_seed,
    stage_state,
    summary_rows,
    summary_table,
    verifier_scores,
    win_rate,
)


def test_accuracy_gate_promotes_only_above_the_incumbent_plus_the_margin():
    """0.86 vs 0.85 with margin 0.005: 0.86 > 0.855, promoted; margin 0.02: 0.86 <= 0.87, refused; equal figures are
    never an improvement."""
    promoted, reason = gate_decision({"accuracy": 0.86}, {"accuracy": 0.85}, "accuracy", 0.005)
    assert promoted and reason == "accuracy 0.8600 > incumbent's 0.8500 + margin 0.005"
    promoted, reason = gate_decision({"accuracy": 0.86}, {"accuracy": 0.85}, "accuracy", 0.02)
    assert not promoted and reason == "accuracy 0.8600 <= incumbent's 0.8500 + margin 0.02"
    assert not gate_decision({"accuracy": 0.85}, {"accuracy": 0.85}, "accuracy", 0.0)[0]


def test_eval_loss_gate_wants_the_loss_lower_by_the_margin():
    """1.20 against 1.25: promoted with margin 0.01 (1.20 < 1.24), refused with margin 0.1 (1.20 >= 1.15)."""
    assert gate_decision({"eval_loss": 1.20}, {"eval_loss": 1.25}, "eval_loss", 0.01) == (
        True, "eval loss 1.2000 < incumbent's 1.2500 - margin 0.01")
    assert not gate_decision({"eval_loss": 1.20}, {"eval_loss": 1.25}, "eval_loss", 0.1)[0]


def test_win_rate_gate_compares_with_a_half_plus_the_margin_and_unmeasured_figures_refuse():
    assert gate_decision({"win_rate": 0.56}, {}, "win_rate", 0.05)[0]
    promoted, reason = gate_decision({"win_rate": 0.54}, {}, "win_rate", 0.05)
    assert not promoted and "0.540" in reason and "0.550" in reason
    promoted, reason = gate_decision({"accuracy": None}, {"accuracy": 0.5}, "accuracy", 0.0)
    assert not promoted and "not measured" in reason
    assert not gate_decision({"accuracy": 0.9}, {}, "accuracy", 0.0)[0]


def test_sign_test_is_the_binomial_tail_over_the_prompts_that_differ():
    """Better on 3 of 3: (1/2)^3 = 0.125. 6 against 5 (11, odd): exactly half the tail, 0.5. 25 against 4:
    (C(29,4) + C(29,3) + C(29,2) + 29 + 1) / 2^29 = 27841 / 536870912. No prompt differs, or none better: p = 1."""
    assert sign_test_p(3, 0) == 0.125
    assert sign_test_p(6, 5) == 0.5
    assert sign_test_p(25, 4) == 27841 / 2**29
    assert sign_test_p(0, 0) == 1.0 and sign_test_p(0, 3) == 1.0


def test_paired_counts_leave_out_the_prompts_both_score_alike():
    assert paired_counts([1, 0, 1, 1, 0], [0, 0, 1, 0, 1]) == (2, 1)
    assert paired_counts([0.2, 0.9], [0.5, 0.5]) == (1, 1)
    with pytest.raises(ValueError):
        paired_counts([1.0], [1.0, 0.0])


def test_gate_with_max_p_value_wants_the_gain_beyond_chance_and_says_so():
    """Round 1 of the bundled pipeline (25 prompts better, 4 worse) is promoted; its round 2 (0.825 against 0.82,
    better on 6 prompts and worse on 5) clears the margin but not the sign test; the margin still comes first; a
    gain with no counted prompts is refused; eval loss is decided on its means."""
    promoted, reason = gate_decision({"accuracy": 0.82, "prompts_better": 25, "prompts_worse": 4},
                                     {"accuracy": 0.715}, "accuracy", 0.0, 0.05)
    assert promoted and reason == ("accuracy 0.8200 > incumbent's 0.7150 + margin 0; better on 25 prompts and worse "
                                   "on 4: one-sided sign test p = 5.2e-05 <= 0.05")
    promoted, reason = gate_decision({"accuracy": 0.825, "prompts_better": 6, "prompts_worse": 5},
                                     {"accuracy": 0.82}, "accuracy", 0.0, 0.05)
    assert not promoted and reason == ("accuracy 0.8250 > incumbent's 0.8200 + margin 0, but better on 6 prompts and "
                                       "worse on 5: one-sided sign test p = 0.5 > gate.max_p_value 0.05")
    assert gate_decision({"accuracy": 0.825, "prompts_better": 6, "prompts_worse": 5}, {"accuracy": 0.82},
                         "accuracy", 0.0, None)[0]
    assert gate_decision({"accuracy": 0.80, "prompts_better": 30, "prompts_worse": 0}, {"accuracy": 0.82},
                         "accuracy", 0.0, 0.05) == (False, "accuracy 0.8000 <= incumbent's 0.8200 + margin 0")
    promoted, reason = gate_decision({"win_rate": 0.6}, {}, "win_rate", 0.0, 0.05)
    assert not promoted and "no sign test" in reason
    assert gate_decision({"eval_loss": 1.2}, {"eval_loss": 1.25}, "eval_loss", 0.0, 0.05)[0]


def test_verifier_scores_score_each_cached_answer_on_its_last_user_turn():
    """The gate's per-prompt outcomes come from the cached greedy answers (``measure``'s ``answers``: the prompt's
    messages, then the answer), the verifier given the last user turn as ``verifier_accuracy`` gives it."""
    from finetune.suite import verify

    figures = {"answers": [
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Reverse the words: owl egg bread"}, {"role": "assistant", "content": "owl egg"}],
    ]}
    assert verifier_scores(figures, verify) == [1.0, 0.0]


def test_win_rate_counts_ties_half():
    """Scores (2, 1, 0, 5) against (1, 1, 3, 4): a win, a tie, a loss, a win -> (1 + 0.5 + 0 + 1) / 4 = 0.625."""
    assert win_rate([2, 1, 0, 5], [1, 1, 3, 4]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_stage_state_skips_finished_resumes_unfinished_and_starts_missing(tmp_path):
    assert stage_state(tmp_path / "missing") == "absent"
    (tmp_path / "empty").mkdir()
    assert stage_state(tmp_path / "empty") == "absent"
    running = tmp_path / "running"
    running.mkdir()
    (running / "config.yaml").write_text("output_dir: x\n")
    assert stage_state(running) == "unfinished"
    (running / "run.json").write_text(json.dumps({"stage": "dpo", "status": "running"}))
    assert stage_state(running) == "unfinished"
    (running / "run.json").write_text(json.dumps({"stage": "dpo", "status": "finished"}))
    assert stage_state(running) == "finished"


def test_every_round_and_run_gets_its_own_seed():
    seeds = {stage_seed(seed, n, i) for seed in range(3) for n in range(1, 4) for i in range(3)}
    assert len(seeds) == 27 and stage_seed(1, 2, 1) == 1021


def test_summary_table_shows_accuracy_by_round_and_the_decision():
    manifests = [
        {"round": 0, "figures": {"base": {"accuracy": 0.1}, "sft": {"accuracy": 0.8}}, "promoted": None,
         "reason": "the starting model"},
        {"round": 1, "figures": {"incumbent": {"accuracy": 0.8}, "candidate": {"accuracy": 0.85, "eval_loss": 1.0}},
         "promoted": True, "reason": "better"},
    ]
    rows = summary_rows(manifests)
    assert rows[1] == {"round": 1, "promoted": True, "reason": "better", "incumbent/accuracy": 0.8,
                       "candidate/accuracy": 0.85, "candidate/eval_loss": 1.0}
    table = summary_table(rows).splitlines()
    assert table[0] == "| round | base | sft | incumbent | candidate | promoted | why |"
    assert table[2] == "| 0 | 10.0% | 80.0% | - | - | - | the starting model |"
    assert table[3] == "| 1 | - | - | 80.0% | 85.0% | yes | better |"


def test_the_final_model_is_the_last_promoted_or_the_start_with_its_next_commands():
    rounds = [{"round": 0, "promoted": None}, {"round": 1, "promoted": True}, {"round": 2, "promoted": False}]
    lines = final_model_lines({"rounds": rounds, "model": "runs/p/round-1/average"}).splitlines()
    assert lines == ["final model: runs/p/round-1/average (promoted in round 1)",
                     "  chat:   finetune chat runs/p/round-1/average",
                     "  export: finetune export runs/p/round-1/average --to gguf"]
    rounds[1]["promoted"] = False
    assert final_model_lines({"rounds": rounds, "model": "runs/p/round-0/sft"}).splitlines()[0] == \
        "final model: runs/p/round-0/sft (the starting model: no round was promoted)"


@pytest.mark.parametrize("argv, message", [
    (["--dpo.overrides=[--output_dir=x]"], "--output_dir is set by the pipeline"),
    (["--rejection_sampling.overrides=[--init=runs/sft]"], "--init is set by the pipeline"),
    (["--dpo.overrides=[train.max_steps=2]"], "must look like --section.key=value"),
    (["--gate.metric=win_rate"], "needs a reward model"),
    (["--gate.data=other.jsonl"], "gate.metric accuracy needs a verifier"),
    (["--gate.metric=bleu"], "gate.metric must be one of"),
    (["--gate.max_p_value=0"], "gate.max_p_value must be in"),
    (["--gate.max_p_value=1.5"], "gate.max_p_value must be in"),
    (["--average.runs=0"], "average.runs must be >= 1"),
    (["--average.combination=linear"], "average.combination must be cat or svd"),
    (["--rounds=0"], "rounds must be >= 1"),
    (["--style=llama4"], "style must be llama3 or llama2"),
    (["--average.seeds=2"], "unknown config key 'average.seeds'"),
    (["--average.checkpoints=-1"], "average.checkpoints must be >= 0"),
    (["--style=llama2", "--average.checkpoints=2"], "style llama2's PPO checkpoints hold its training state"),
])
def test_bad_pipeline_configs_are_one_line(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        parse_args(PipelineRunConfig, argv)


@pytest.mark.parametrize("status", [None, "running"])
def test_a_missing_or_unfinished_init_is_one_line_before_output_dir_exists(tmp_path, status):
    """The start is checked after the stage configs: the base is measured before any stage runs, so a missing run
    would otherwise fail inside the measurement as a hub lookup of its path."""
    from finetune import pipeline

    init = tmp_path / "sft"
    if status:
        init.mkdir()
        (init / "run.json").write_text(json.dumps({"stage": "sft", "status": status}))
    out = tmp_path / "out"
    cfg = parse_args(PipelineRunConfig, ["--init", str(init), "--output_dir", str(out)])
    message = "no such directory" if status is None else "that run did not finish"
    with pytest.raises(ConfigError, match=f"^init {init}: {message}"):
        pipeline.run(cfg)
    assert not out.exists()


def test_gate_on_other_data_resolves_no_verifier_and_takes_the_loss():
    cfg = parse_args(PipelineRunConfig, ["--gate.data=other.jsonl", "--gate.metric=eval_loss"])
    assert cfg.gate.verifier is None
    assert parse_args(PipelineRunConfig, []).gate.verifier == "finetune.suite:verify"


@pytest.mark.parametrize("name, settings, whole", [("reward", GATHERED_PAIRS_DATA, True),
                                                   ("dpo", ROUND_PAIRS_DATA, False)])
def test_a_file_the_pipeline_writes_is_read_as_the_preference_file_it_is(tmp_path, name, settings, whole):
    """The llama3_8b stage configs read UltraFeedback's ``train_prefs`` split: the round's JSONL file has no such
    split, and the reward config's ``max_train_samples`` chose its own pairs already (the gathered file is read
    whole, or the earlier rounds' pairs at its end are cut off). DPO keeps its limit on the round's pairs."""
    from finetune.config import PipelineDPOStage, PipelineRewardStage

    stage = PipelineRewardStage if name == "reward" else PipelineDPOStage
    spec = stage(config=f"recipes/configs/llama3_8b/{name}_qlora.yaml", overrides=["--data.max_train_samples=8"])
    pairs = tmp_path / "pairs.jsonl"
    cfg = stage_config(name, spec, tmp_path / name, False, init=str(tmp_path / "sft"), **settings,
                       **{"data.train": pairs})
    assert (cfg.data.train, cfg.data.format, cfg.data.split) == (str(pairs), "preference", None)
    assert cfg.data.max_train_samples == (None if whole else 8) and not cfg.data.skip_invalid
    assert cfg.data.eval_split == "test_prefs"  # the held-out pairs stay the config's


# ---------------------------------------------------------------------------------------------------------------
# Averaging checkpoints

MARKER = "checkpoint_complete.json"


def test_the_last_complete_checkpoints_by_step_are_averaged(tmp_path):
    """From a DPO run directory: checkpoints by step (10 after 9), a half-written one (no marker) or a staging
    directory never counted, files and other directories ignored."""
    listing = {
        "adapter_model.safetensors": None, "config.yaml": None, "runs": ["Jan01"],
        "checkpoint-2": ["adapter_model.safetensors", MARKER],
        "checkpoint-10": ["adapter_model.safetensors", MARKER, "ref"],
        "checkpoint-9": [MARKER, "adapter_model.safetensors"],
        "checkpoint-4": ["adapter_model.safetensors", MARKER],
        "checkpoint-12": ["adapter_model.safetensors"],
        ".checkpoint-14.staging": ["adapter_model.safetensors", MARKER],
        "checkpoint-x": [MARKER],
    }
    run, bare = tmp_path / "run", tmp_path / "bare"
    for name, inside in listing.items():
        if inside is None:
            (run / name).parent.mkdir(parents=True, exist_ok=True)
            (run / name).write_text("")
            continue
        (run / name).mkdir(parents=True)
        for item in inside:
            (run / name / item).write_text("")
    bare.mkdir()
    (bare / "adapter_model.safetensors").write_text("")
    names = lambda count, path=run: [p.name for p in last_checkpoints(path, count)]  # noqa: E731
    assert names(3) == ["checkpoint-4", "checkpoint-9", "checkpoint-10"]
    assert names(1) == ["checkpoint-10"]
    assert names(9) == ["checkpoint-2", "checkpoint-4", "checkpoint-9", "checkpoint-10"]
    assert names(0) == [] and names(2, bare) == []


def make_dpo_run(path, steps):
    import yaml

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"train": {"save_steps": 2, "save_total_limit": 2}}))
    for step in steps:
        (path / f"checkpoint-{step}").mkdir()
        (path / f"checkpoint-{step}" / MARKER).write_text("{}")
    return path


def test_averaged_directories_are_the_runs_or_each_runs_last_checkpoints(tmp_path):
    a, b = make_dpo_run(tmp_path / "seed-10", [2, 4, 6]), make_dpo_run(tmp_path / "seed-11", [4, 6])
    assert averaged_directories([a, b], 0) == [a, b]
    assert averaged_directories([a, b], 2) == [a / "checkpoint-4", a / "checkpoint-6", b / "checkpoint-4",
                                               b / "checkpoint-6"]
    with pytest.raises(ConfigError, match=r"average.checkpoints=3: .*seed-11 kept 2 complete checkpoint\(s\) "
                                          r"\(checkpoint-4, checkpoint-6; train.save_steps=2, train.save_total_limit=2\)"):
        averaged_directories([a, b], 3)


DPO_SAVES = "--dpo.overrides=[--train.logging_steps=1, --train.save_steps=2, --train.max_steps=6, "


@pytest.mark.parametrize("argv, message", [
    (["--average.checkpoints=3"], r"average.checkpoints=3 averages each DPO run's last 3 checkpoints, but dpo \(from "
                                  r"recipes/configs/tiny/dpo_lora.yaml\) keeps train.save_total_limit=2; add "
                                  r"--train.save_total_limit=3 to dpo.overrides"),
    (["--average.checkpoints=4", DPO_SAVES + "--train.save_total_limit=null]"],
     r"writes 3 \(train.max_steps=6, train.save_steps=2\); lower train.save_steps in dpo.overrides"),
    (["--average.checkpoints=3", DPO_SAVES + "--train.save_total_limit=3]"], None),
    (["--average.checkpoints=3", "--dpo.overrides=[--train.save_total_limit=null]"], None),  # epochs: checked after
])
def test_the_dpo_stage_must_keep_the_checkpoints_averaged(tmp_path, argv, message):
    cfg = parse_args(PipelineRunConfig, argv)
    if message is None:
        check_stage_configs(cfg, tmp_path)
        return
    with pytest.raises(ConfigError, match=message):
        check_stage_configs(cfg, tmp_path)
