"""Rejection sampling (recipes/rejection_sampling.py): selection by hand, then end to end on the tiny model from a
stand-in SFT run: K samples per prompt, the best kept, threshold mode, preference pairs that data_formats reads back,
--generate_only, prompts that kept nothing counted, and the fine-tune done by the SFT stage from the SFT adapter."""

import json
import sys
from pathlib import Path

import pytest
import recipe_runs
import torch
from factories import make_full_sft_run, make_sft_run
from toy_verifiers import shortness

from finetune.config import ConfigError, RejectionParams, RejectionSamplingRunConfig, parse_args
from finetune.stages import rejection_sampling as rs

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "rejection_sampling.py"


def row(prompt_index, sample, score, response=None):
    return {"prompt_index": prompt_index, "sample": sample, "score": score,
            "response": f"answer {prompt_index}.{sample}" if response is None else response}


def test_best_keeps_the_highest_score_per_prompt_first_on_ties():
    rows = [row(0, 0, 0.2), row(0, 1, 0.9), row(0, 2, 0.9), row(1, 0, 0.1), row(1, 1, 0.0)]
    kept, pairs = rs.select(rows, RejectionParams(selection="best"))
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(0, 1), (1, 0)]
    assert [((b["prompt_index"], b["sample"]), (w["prompt_index"], w["sample"])) for b, w in pairs] == [
        ((0, 1), (0, 0)), ((1, 0), (1, 1))]


def test_min_score_and_threshold_can_keep_nothing_for_a_prompt():
    rows = [row(0, 0, 1.0), row(0, 1, 0.0), row(1, 0, 0.0), row(1, 1, 0.0), row(2, 0, 1.0), row(2, 1, 1.0)]
    kept, pairs = rs.select(rows, RejectionParams(selection="best", min_score=1.0))
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(0, 0), (2, 0)]
    kept, _ = rs.select(rows, RejectionParams(selection="threshold", threshold=0.5))
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(0, 0), (2, 0), (2, 1)]
    # Pairs need a margin: prompt 1 (all 0) and prompt 2 (all 1) give none.
    assert [b["prompt_index"] for b, _ in pairs] == [0]
    _, pairs = rs.select(rows, RejectionParams(min_margin=1.0))
    assert pairs == []


def test_samples_the_verifier_failed_are_kept_only_when_asked():
    """Prompt 0's best fails the verifier (a reward model likes it): kept only with keep_unverified."""
    def scored(prompt_index, sample, verified, reward):
        return {**row(prompt_index, sample, verified + reward), "scores": {"v:f": verified, "rm": reward}}

    rows = [scored(0, 0, 0.0, 2.0), scored(0, 1, 0.0, 0.5), scored(1, 0, 1.0, 0.1), scored(1, 1, 0.0, 0.3)]
    kept, pairs = rs.select(rows, RejectionParams(), verifier="v:f")
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(1, 0)]
    assert len(pairs) == 2  # pairs still rank by the total score
    kept, _ = rs.select(rows, RejectionParams(keep_unverified=True), verifier="v:f")
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(0, 0), (1, 0)]
    kept, _ = rs.select(rows, RejectionParams(selection="threshold", threshold=0.2), verifier="v:f")
    assert [(r["prompt_index"], r["sample"]) for r in kept] == [(1, 0)]


def test_empty_responses_are_never_kept_or_paired():
    rows = [row(0, 0, 5.0, response="  "), row(0, 1, 1.0), row(0, 2, 0.0)]
    kept, pairs = rs.select(rows, RejectionParams())
    assert [r["sample"] for r in kept] == [1] and [(b["sample"], w["sample"]) for b, w in pairs] == [(1, 2)]


def test_a_rejected_reply_is_never_the_chosen_one_with_other_whitespace(tmp_path):
    """A reward model can score "CASTLE" above "CASTLE\\x1c" (a separator, whitespace to str.strip): such a pair is
    no preference, and the preference reader refuses it, so DPO would stop on the stage's own pairs.jsonl. The
    worst sample whose text differs is paired instead, and a prompt with no such sample gives no pair."""
    from data_formats import load_preferences

    rows = [row(0, 0, 0.9, "CASTLE"), row(0, 1, 0.1, "CASTLE\x1c"), row(0, 2, 0.5, "CASTLES"),
            row(1, 0, 0.8, "LEAF"), row(1, 1, 0.2, " LEAF ")]
    for r in rows:
        r["prompt"] = [{"role": "user", "content": f"Write in capital letters: prompt {r['prompt_index']}"}]
    kept, pairs = rs.select(rows, RejectionParams())
    assert [(b["sample"], w["sample"]) for b, w in pairs] == [(0, 2)]
    rs.write_outputs(tmp_path, rows, kept, pairs)
    read = list(load_preferences(str(tmp_path / "pairs.jsonl")))
    assert [(p.chosen[0]["content"], p.rejected[0]["content"]) for p in read] == [("CASTLE", "CASTLES")]


# The SFT train prompts sampled at temperature 1 over all tokens (what these tests were worked out on), and shortness
# is a graded stand-in for a verifier that scores long answers 0, i.e. failed: kept here all the same, so every
# prompt keeps its best.
QUICK = ["--data.train=bundled:suite_messages_train.jsonl", "--data.max_train_samples=6", "--data.max_eval_samples=4",
         "--eval.num_samples=4", "--sampling.num_samples=4",
         "--sampling.max_new_tokens=10", "--sampling.temperature=1.0", "--sampling.top_k=0",
         "--score.verifier=toy_verifiers:shortness",
         "--rejection.keep_unverified=true"]


def run_recipe(argv):
    return recipe_runs.run_recipe("rejection_sampling", RejectionSamplingRunConfig, argv)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return make_sft_run(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module")
def generated(tmp_path_factory, sft_run):
    out = tmp_path_factory.mktemp("rs") / "gen"
    assert run_recipe(["--init", str(sft_run), "--output_dir", str(out), *QUICK, "--generate_only"]) == 0
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_k_samples_per_prompt_scored_and_the_best_kept(generated):
    from finetune.data import load_conversations

    samples = read_jsonl(generated / "samples.jsonl")
    assert [(s["prompt_index"], s["sample"]) for s in samples] == [(p, k) for p in range(6) for k in range(4)]
    prompts = [c.messages[0]["content"] for c in load_conversations("bundled:suite_messages_train.jsonl", limit=6)]
    for s in samples:
        assert s["prompt"] == [{"role": "user", "content": prompts[s["prompt_index"]]}]
        assert s["score"] == shortness("", s["response"])
    assert len({s["response"] for s in samples}) > 6, "K different samples per prompt"

    kept = load_conversations(str(generated / "kept.jsonl"))
    by_prompt = {p: [s for s in samples if s["prompt_index"] == p] for p in range(6)}
    assert len(kept) == 6
    for conv in kept:
        mine = [s for s in by_prompt[conv.meta["prompt_index"]] if s["response"].strip()]  # empty ones never kept
        best = max(mine, key=lambda s: s["score"])
        assert conv.meta["score"] == best["score"] and conv.messages[-1]["content"] == best["response"]
        assert conv.messages[:-1] == best["prompt"]
    assert sum(s["kept"] for s in samples) == 6


def test_preference_pairs_read_back_with_data_formats(generated):
    import data_formats

    samples = read_jsonl(generated / "samples.jsonl")
    pairs = data_formats.load_preferences(str(generated / "pairs.jsonl"))
    assert pairs
    for pair in pairs:
        mine = [s for s in samples if s["prompt_index"] == pair.meta["prompt_index"]]
        assert pair.meta["chosen_score"] == max(s["score"] for s in mine if s["response"].strip())
        assert pair.meta["rejected_score"] == min(s["score"] for s in mine if s["response"].strip())
        assert pair.meta["chosen_score"] > pair.meta["rejected_score"]
        assert pair.chosen[0]["content"] != pair.rejected[0]["content"]


def test_generate_only_reports_and_stops_before_fine_tuning(generated):
    samples = read_jsonl(generated / "samples.jsonl")
    summary = json.loads((generated / "summary.json").read_text())
    assert not (generated / "sft").exists()
    assert summary["num_prompts"] == 6 and summary["num_samples"] == 24 and summary["kept_samples"] == 6
    assert summary["mean_score_all"] == pytest.approx(sum(s["score"] for s in samples) / 24)
    kept_scores = [s["score"] for s in samples if s["kept"]]
    assert summary["mean_score_kept"] == pytest.approx(sum(kept_scores) / 6)
    answered = [s["score"] for s in samples if s["response"].strip()]
    assert summary["mean_score_kept"] >= sum(answered) / len(answered)
    assert summary["prompts_kept_nothing"] == 0
    assert "eval_accuracy" not in summary


def test_threshold_mode_counts_prompts_that_kept_nothing(tmp_path, sft_run, generated):
    """Same seed, same samples as the generate_only run; a threshold between their scores keeps some prompts' samples
    and none of the others'."""
    samples = read_jsonl(generated / "samples.jsonl")
    best = sorted({max(s["score"] for s in samples if s["prompt_index"] == p) for p in range(6)})
    threshold = best[len(best) // 2]
    out = tmp_path / "thr"
    assert run_recipe(["--init", str(sft_run), "--output_dir", str(out), *QUICK, "--generate_only",
                       "--rejection.selection=threshold", f"--rejection.threshold={threshold}"]) == 0
    again = read_jsonl(out / "samples.jsonl")
    assert [s["response"] for s in again] == [s["response"] for s in samples], "the seed repeats the samples"
    summary = json.loads((out / "summary.json").read_text())
    kept = [s for s in again if s["kept"]]
    assert kept and all(s["score"] >= threshold for s in kept)
    assert len(kept) == sum(s["score"] >= threshold for s in again if s["response"].strip())
    nothing = sum(1 for p in range(6) if not any(s["kept"] for s in again if s["prompt_index"] == p))
    assert summary["prompts_kept_nothing"] == nothing > 0


def test_fine_tune_is_the_sft_stage_continuing_the_sft_adapter(tmp_path, sft_run):
    from safetensors.torch import load_file

    from finetune.run_dir import RunDir

    out = tmp_path / "rs"
    assert run_recipe(["--init", str(sft_run), "--output_dir", str(out), *QUICK, "--train.max_steps=2",
                       "--train.warmup_ratio=0", "--train.logging_steps=1", "--train.save_steps=2",
                       "--train.learning_rate=1e-2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("init_eval_accuracy", "eval_accuracy", "init_eval_loss", "eval_loss", "mean_score_all"):
        assert key in summary, key
    assert summary["train_steps"] == 2 and summary["sft_output_dir"] == str(out / "sft")
    sft_cfg = RunDir.read(out / "sft").config
    assert sft_cfg["init"] == str(sft_run) and sft_cfg["data"]["train"] == str(out / "kept.jsonl")
    before = load_file(sft_run / "adapter_model.safetensors")
    after = load_file(out / "sft" / "adapter_model.safetensors")
    assert before.keys() == after.keys(), "the SFT adapter continued, with its shape"
    assert max((before[k] - after[k]).abs().max() for k in before) > 0
    assert all(torch.isfinite(v).all() for v in after.values())


def test_bad_input_is_one_line(tmp_path, sft_run, capsys):
    with pytest.raises(ConfigError, match="needs --init"):
        parse_args(RejectionSamplingRunConfig, [])
    assert run_recipe(["--init", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "error: --init" in capsys.readouterr().err
    assert run_recipe(["--init", str(sft_run), "--output_dir", str(tmp_path / "o"), "--score.verifier=nope:f"]) == 2
    assert "score.verifier: cannot import module 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="rejection.selection must be best or threshold"):
        parse_args(RejectionSamplingRunConfig, ["--init", "x", "--rejection.selection=top"])


def test_resume_reuses_complete_samples_and_redraws_incomplete_ones(tmp_path, generated, sft_run, capsys):
    """--resume on a finished --generate_only run reuses its samples as they are; with other sampling settings it is
    refused; without the completion marker (killed while sampling) it samples again, the same seeded samples."""
    import shutil

    out = tmp_path / "gen"
    shutil.copytree(generated, out)
    argv = ["--init", str(sft_run), "--output_dir", str(out), *QUICK, "--generate_only", "--resume"]
    samples = (out / "samples.jsonl").read_bytes()
    marker = (out / rs.GENERATION_MARKER).read_bytes()

    assert run_recipe(argv) == 0
    said = capsys.readouterr().out
    assert "reusing the complete samples" in said and "starting from the beginning" not in said
    assert (out / "samples.jsonl").read_bytes() == samples and (out / rs.GENERATION_MARKER).read_bytes() == marker

    assert run_recipe([*argv, "--sampling.temperature=0.5"]) == 2
    assert "drawn with other settings (sampling.temperature)" in capsys.readouterr().err

    (out / rs.GENERATION_MARKER).unlink()
    (out / "samples.jsonl").write_text('{"half a line')
    assert run_recipe(argv) == 0
    assert "reusing" not in capsys.readouterr().out
    assert (out / "samples.jsonl").read_bytes() == samples and (out / rs.GENERATION_MARKER).is_file()

    assert run_recipe(["--init", str(sft_run), "--output_dir", str(tmp_path / "none"), *QUICK, "--resume"]) == 2
    assert "holds no rejection-sampling run to resume" in capsys.readouterr().err


def test_resume_after_kill_in_the_fine_tune_matches_an_uninterrupted_run(tmp_path, sft_run):
    """Kill -9 a run once its fine-tune has written sft/checkpoint-2, resume it: the samples are reused (not drawn
    again), the fine-tune continues from the checkpoint, and the loss curve and summary equal a run never killed."""
    from recipe_processes import checkpoint_complete, losses_by_step, run_to_end, run_until

    def command(out, *extra):
        return [sys.executable, RECIPE, "--init", sft_run, "--output_dir", out, *QUICK, "--train.max_steps=6",
                "--train.per_device_batch_size=2", "--train.logging_steps=1", "--train.save_steps=2",
                "--train.save_total_limit=10", "--train.warmup_ratio=0", *extra]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_to_end(command(straight))
    run_until(command(killed), checkpoint_complete(killed / "sft", 2))
    assert not (killed / "summary.json").exists()
    samples = (killed / "samples.jsonl").read_bytes()

    output = run_to_end(command(killed, "--resume"))
    assert "reusing the complete samples" in output and "resuming from" in output
    assert (killed / "samples.jsonl").read_bytes() == samples
    assert losses_by_step(killed / "sft") == pytest.approx(losses_by_step(straight / "sft"), rel=1e-4)
    a = json.loads((straight / "summary.json").read_text())
    b = json.loads((killed / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "init_eval_loss", "eval_accuracy", "init_eval_accuracy", "mean_score_all",
                "kept_samples", "preference_pairs", "train_steps"):
        assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_full_weights_sft_run_is_sampled_and_gets_a_new_adapter(tmp_path):
    from finetune.run_dir import RunDir

    greedy = [*QUICK, "--sampling.temperature=0", "--sampling.num_samples=1", "--data.max_train_samples=8"]
    moved = make_full_sft_run(tmp_path / "sft_moved", noise=0.3)
    untouched = make_full_sft_run(tmp_path / "sft_untouched", noise=0.0)
    assert run_recipe(["--init", str(untouched), "--output_dir", str(tmp_path / "a"), *greedy, "--generate_only"]) == 0
    assert run_recipe(["--init", str(moved), "--output_dir", str(tmp_path / "b"), *greedy, "--train.max_steps=1",
                       "--adapter.r=4", "--score.verifier=finetune.suite:verify", "--rejection.selection=threshold",
                       "--rejection.threshold=0"]) == 0
    # Sampled from the init's weights, not from model.name's.
    replies = [[row["response"] for row in read_jsonl(tmp_path / run / "samples.jsonl")] for run in ("a", "b")]
    assert replies[0] != replies[1]
    # The fine-tune is the SFT stage from full weights: a new adapter of the configured shape on the SFT model.
    sft_cfg = RunDir.read(tmp_path / "b" / "sft").config
    assert sft_cfg["init"] == str(moved) and sft_cfg["adapter"]["r"] == 4
    assert (tmp_path / "b" / "sft" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["train_steps"] == 1 and "init_eval_accuracy" in summary


def test_a_stage_continuing_an_adapter_trained_on_full_weights_needs_those_weights_as_base(tmp_path, capsys):
    # Chaining after rejection sampling from a full fine-tune: its adapter is meaningless on model.name's base.
    full = make_full_sft_run(tmp_path / "sft_full", noise=0.3)
    first = tmp_path / "rs1"
    assert run_recipe(["--init", str(full), "--output_dir", str(first), *QUICK, "--train.max_steps=1",
                       "--rejection.selection=threshold", "--rejection.threshold=0"]) == 0
    again = ["--init", str(first / "sft"), "--output_dir", str(tmp_path / "rs2"), *QUICK, "--generate_only"]
    assert run_recipe(again) == 2
    assert f"pass --model.name={full}" in capsys.readouterr().err
    assert run_recipe([*again, f"--model.name={full}"]) == 0


def test_sample_groups_lays_out_g_samples_per_prompt_from_one_generate_call(tokenizer):
    """The shared rollout (finetune.rollout.sample_groups, used by rejection sampling and PPO): sample j of the i-th
    prompt is at i * G + j, its completion is what one seeded generate call over the prompts repeated G times gives,
    and the scorer sees every sample once, numbered prompt.index * G + j."""
    from transformers import AutoModelForCausalLM

    from finetune.data import load_conversations
    from finetune.generation import Decoding, generate
    from finetune.models import resolve_model
    from finetune.prompts import load_prompts
    from finetune.rollout import sample_groups
    from finetune.scorers import VerifierScorer, WeightedSum
    from finetune.templates import get_template, stop_token_ids

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).eval()
    template = get_template("llama3", tokenizer)
    prompts, _ = load_prompts(load_conversations("bundled:suite_messages_train.jsonl", limit=3), template, tokenizer, 256)
    prompts = prompts[1:]  # prompt indices 1 and 2: the sample numbers follow the prompts' own indices
    seen = []

    def remember(samples):
        seen.extend(s.index for s in samples)
        return [float(len(s.response)) for s in samples]

    remember.name = "remember"
    scorer = WeightedSum([(VerifierScorer(shortness, name="shortness"), 1.0), (remember, 2.0)])
    sampling, stop_ids = Decoding(6, 1.0, top_k=20, seed=5), stop_token_ids(template, tokenizer)
    samples = sample_groups(model, tokenizer, prompts, 3, stop_ids, sampling, 4, scorer)
    direct = generate(model, tokenizer, [p.ids for p in prompts for _ in range(3)], stop_ids, sampling, 4)
    assert [(s.prompt.index, s.sample) for s in samples] == [(p, j) for p in (1, 2) for j in range(3)]
    assert [s.completion for s in samples] == direct
    assert seen == [3, 4, 5, 6, 7, 8]  # prompt 1: 3 + j, prompt 2: 6 + j
    for s in samples:
        assert s.scores == {"shortness": shortness("", s.completion.text), "remember": float(len(s.completion.text))}
        assert s.score == pytest.approx(s.scores["shortness"] + 2 * len(s.completion.text))
