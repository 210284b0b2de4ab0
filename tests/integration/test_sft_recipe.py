"""recipes/sft.py end to end on the tiny model: what the run leaves behind, bad input, resume after a real kill."""

import json
import sys
from pathlib import Path

import pytest
import recipe_runs
from recipe_processes import losses_by_step, run_to_end, run_until
from recipe_runs import assert_run_directory

from finetune.config import SFTRunConfig
from finetune.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "sft.py"

# Small and quick: 64 conversations, 8 optimizer steps, a checkpoint every 2.
QUICK = [
    "--data.max_train_samples=64",
    "--data.max_eval_samples=16",
    "--train.max_steps=8",
    "--train.per_device_batch_size=2",
    "--train.logging_steps=2",
    "--train.save_steps=2",
    "--train.save_total_limit=10",
    "--eval.num_samples=8",
]


def run_recipe(argv):
    return recipe_runs.run_recipe("sft", SFTRunConfig, argv)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "run"
    assert run_recipe(["--output_dir", str(out), *QUICK]) == 0
    return out


def test_run_directory_contents(finished_run):
    out = finished_run
    assert_run_directory(out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == [2, 4, 6, 8]
    for r in step_rows:
        assert r["loss"] > 0 and r["learning_rate"] >= 0 and r["tokens_per_second"] > 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "base_eval_loss", "eval_accuracy", "base_eval_accuracy"):
        assert isinstance(summary[key], float), key
    assert summary["train_data"]["records"] == 64 and summary["train_data"]["skipped_records"] == 0
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints and all((c / "checkpoint_complete.json").is_file() for c in checkpoints)


def test_saved_tokenizer_and_generation_config_stop_at_eot(finished_run):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(finished_run)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot in GenerationConfig.from_pretrained(finished_run).eos_token_id
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_adapter_loads_onto_the_base(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    model = PeftModel.from_pretrained(base, finished_run)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_the_card_and_adapter_config_name_the_base_as_given_and_the_run_still_loads(finished_run, tmp_path):
    """adapter_config.json says ``tiny`` (model.name), not the absolute directory it was loaded from, in the run and
    in its adapter export; our README replaces PEFT's "fine-tuned version of [None]"; the export still merges."""
    from finetune.export import export

    assert json.loads((finished_run / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"
    card = (finished_run / "README.md").read_text()
    assert "[None]" not in card and "| base model | `tiny` |" in card and "`<|eot_id|>`" in card
    summary = json.loads((finished_run / "summary.json").read_text())
    assert f"| eval_loss | {summary['eval_loss']:.4f} |" in card and f"`sft ({finished_run})` <- `base tiny`" in card
    assert export(finished_run, "merged", tmp_path / "merged").is_dir()


def test_refuses_non_empty_output_dir(finished_run, capsys):
    assert run_recipe(["--output_dir", str(finished_run), *QUICK]) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err


def test_saved_configs_keep_the_kv_cache_on(finished_run):
    """Training turns the cache off on the live model only: the run's generation config says use_cache true."""
    assert json.loads((finished_run / "generation_config.json").read_text())["use_cache"] is True


def test_a_full_fine_tune_saves_its_model_with_the_cache_on(tmp_path):
    """Full weights: config.json and generation_config.json both say use_cache true, run.json says kind full, and
    the model loads and generates with its cache."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    assert run_recipe(["--output_dir", str(out), "--adapter.method=full", "--train.max_steps=2", "--data.eval=null",
                       "--data.max_train_samples=8", "--eval.before_training=false", "--train.save_steps=1000"]) == 0
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["use_cache"] is True, name
    assert json.loads((out / "run.json").read_text())["kind"] == "full"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.use_cache and model.generation_config.use_cache


def test_the_run_records_that_it_finished(finished_run):
    state = json.loads((finished_run / "run.json").read_text())
    assert state["stage"] == "sft" and state["status"] == "finished" and state["kind"] == "adapter"
    assert not list(finished_run.glob(".final-staging*"))


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_a_typo_in_the_data_with_overwrite_leaves_the_finished_run_untouched(finished_run, capsys):
    before = _snapshot(finished_run)
    assert run_recipe(["--output_dir", str(finished_run), *QUICK, "--data.train=missing.jsonl", "--overwrite"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert _snapshot(finished_run) == before


def test_a_run_failing_after_it_started_puts_the_overwritten_run_back(finished_run, tmp_path, capsys):
    """--overwrite, then a NaN stop at step 2: the previous run is back as it was, and nothing is left beside it."""
    before = _snapshot(finished_run)
    code = run_recipe(["--output_dir", str(finished_run), "--overwrite", "--data.max_train_samples=16",
                       "--data.eval=null", "--train.max_steps=4", "--train.logging_steps=1",
                       "--train.learning_rate=1e9", "--train.warmup_ratio=0", "--eval.before_training=false"])
    assert code == 2 and "restored" in capsys.readouterr().err
    assert _snapshot(finished_run) == before
    assert sorted(p.name for p in finished_run.parent.iterdir()) == [finished_run.name]


def test_a_failed_run_does_not_block_the_corrected_rerun(tmp_path, capsys, monkeypatch):
    """Bad data fails before the output directory exists; a run that fails after it started (here: loading the
    model raises) leaves an unfinished run with nothing to resume, which the corrected plain rerun replaces."""
    from finetune.stages import sft

    out = tmp_path / "run"
    assert run_recipe(["--output_dir", str(out), "--data.train=missing.jsonl"]) == 2
    assert not out.exists()

    def broken(*args):
        raise RuntimeError("the model failed to load")

    with monkeypatch.context() as patch:
        patch.setattr(sft, "load_model", broken)
        with pytest.raises(RuntimeError, match="failed to load"):
            run_recipe(["--output_dir", str(out), *QUICK, "--eval.before_training=false", "--data.eval=null"])
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    capsys.readouterr()
    assert run_recipe(["--output_dir", str(out), *QUICK, "--train.max_steps=2", "--eval.before_training=false",
                       "--data.eval=null"]) == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_an_unfinished_run_is_refused_as_init(tmp_path, capsys):
    from factories import make_sft_run

    from finetune.run_dir import write_run_state

    sft = make_sft_run(tmp_path / "sft")
    write_run_state(sft, "sft", "running")
    assert run_recipe(["--output_dir", str(tmp_path / "next"), f"--init={sft}", *QUICK]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert not (tmp_path / "next").exists()


def test_bad_data_is_one_line_error(tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{oops\n')
    code = run_recipe(["--output_dir", str(tmp_path / "run"), f"--data.train={data}", "--data.eval=null"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "bad.jsonl, line 2" in err and "Traceback" not in err


def test_unknown_key_is_one_line_error(tmp_path, capsys):
    assert run_recipe(["--output_dir", str(tmp_path / "r"), "--train.lr=1"]) == 2
    assert "unknown config key 'train.lr'" in capsys.readouterr().err


def _command(out, extra=()):
    args = [*QUICK, "--train.max_steps=16", "--eval.before_training=false", "--eval.num_samples=4", *extra]
    return [sys.executable, RECIPE, "--output_dir", out, *args]


def _gone_after_complete(checkpoint: Path):
    """A ``run_until`` predicate: ``checkpoint`` was seen complete and has since been removed (rotated away)."""
    seen = []

    def predicate() -> bool:
        if (checkpoint / "checkpoint_complete.json").is_file():
            seen.append(True)
        return bool(seen) and not checkpoint.exists()

    return predicate


def test_resume_after_kill_in_the_rotation_window_reproduces_the_uninterrupted_loss_curve(tmp_path):
    """save_total_limit=1: kill -9 the moment checkpoint-2 has been rotated away (after checkpoint-4 was written).
    checkpoint-4 is already complete (its marker goes in before any old checkpoint is removed), --resume continues
    from it, metrics.jsonl ends with one row per logged step, and the losses equal an uninterrupted run's."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    limit = ["--train.save_total_limit=1"]
    run_to_end(_command(straight, limit))
    run_until(_command(killed, limit), _gone_after_complete(killed / "checkpoint-2"), poll=0.002)
    assert not (killed / "summary.json").exists()
    assert (killed / "checkpoint-4" / "checkpoint_complete.json").is_file()

    output = run_to_end(_command(killed, [*limit, "--resume"]))
    assert "resuming from" in output and "checkpoint-4" in output
    steps = [row["step"] for row in read_metrics(killed) if "loss" in row]
    assert steps == sorted(set(steps)) == [2, 4, 6, 8, 10, 12, 14, 16], "one row per step"
    assert losses_by_step(killed) == pytest.approx(losses_by_step(straight), rel=1e-4)
    # The summary's train_loss is the mean over all steps, not only those run after the resume.
    summaries = [json.loads((out / "summary.json").read_text()) for out in (straight, killed)]
    assert summaries[1]["train_loss"] == pytest.approx(summaries[0]["train_loss"], rel=1e-4)


def test_a_kill_during_the_first_checkpoint_leaves_a_directory_resume_and_a_rerun_accept(tmp_path):
    """Kill -9 once checkpoint-2 has appeared; if its marker made it in before the kill, take it out (and cut a
    file short), which is what a kill a moment earlier leaves. Both --resume and a plain rerun then finish."""
    import shutil

    out = tmp_path / "killed"
    run_until(_command(out, ["--train.max_steps=4"]), (out / "checkpoint-2").is_dir, poll=0.002)
    (out / "checkpoint-2" / "checkpoint_complete.json").unlink(missing_ok=True)
    for weights in (out / "checkpoint-2").glob("*.safetensors"):
        weights.write_bytes(weights.read_bytes()[:10])
    shutil.copytree(out, tmp_path / "copy")

    output = run_to_end(_command(out, ["--train.max_steps=4", "--resume"]))
    assert "starting from the beginning" in output
    assert [row["step"] for row in read_metrics(out) if "loss" in row] == [2, 4]
    run_to_end(_command(tmp_path / "copy", ["--train.max_steps=4"]))
    for run in (out, tmp_path / "copy"):
        assert json.loads((run / "run.json").read_text())["status"] == "finished"


def _blow_up(out, learning_rate, warmup_ratio):
    return run_recipe([
        "--output_dir", str(out), "--data.max_train_samples=32", "--data.eval=null", "--train.max_steps=6",
        "--train.logging_steps=1", "--train.save_steps=1", f"--train.learning_rate={learning_rate}",
        f"--train.warmup_ratio={warmup_ratio}", "--eval.before_training=false",
    ])


def test_nan_stop_names_no_checkpoint_the_blow_up_ruined(tmp_path, capsys):
    """At a learning rate of 1e9 from the first step, checkpoint-1 holds weights the first update already ruined
    (step 2's gradients are NaN): the run stops at step 2 with one line, names no last good checkpoint, unmarks
    checkpoint-1 so --resume does not continue from it, and writes no adapter or summary."""
    out = tmp_path / "run"
    assert _blow_up(out, 1e9, 0) == 2
    err = capsys.readouterr().err
    assert "error: grad_norm nan at step 2; stopped without saving. Last good checkpoint: none." in err
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-1" / "checkpoint_complete.json").exists()
    assert not (out / "checkpoint-2").exists()
    assert not (out / "summary.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_nan_stop_names_the_checkpoint_whose_next_step_was_finite(tmp_path, capsys):
    """Linear warm-up to 1e6 over 3 steps: the first update has learning rate 0, the second 3.3e5. Step 2's loss and
    gradients (on checkpoint-1's weights) are finite, step 3's gradients (on checkpoint-2's) are NaN: checkpoint-1 is
    named, its adapter is the untouched initial one (B = 0), checkpoint-2 is unmarked, and --resume continues from
    checkpoint-1."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert _blow_up(out, 1e6, 0.5) == 2
    err = capsys.readouterr().err
    assert "error: grad_norm nan at step 3" in err and f"Last good checkpoint: {out / 'checkpoint-1'}." in err
    assert (out / "checkpoint-1" / "checkpoint_complete.json").is_file()
    assert not (out / "checkpoint-2" / "checkpoint_complete.json").exists()
    good = load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    assert all(t.isfinite().all() and t.abs().max() < 1 for t in good.values())
    assert all(t.abs().max() == 0 for name, t in good.items() if "lora_B" in name)
    from finetune.runs import latest_complete_checkpoint

    assert latest_complete_checkpoint(out) == out / "checkpoint-1"


def test_learning_rate_beyond_float_range_is_the_same_clean_stop(tmp_path, capsys):
    """lr 1e39 does not fit a float32: the optimizer step raises torch's overflow error, reported as the same
    one-line stop (exit status 2, no traceback)."""
    out = tmp_path / "run"
    assert _blow_up(out, 1e39, 0) == 2
    err = capsys.readouterr().err
    assert "error: the optimizer step overflowed" in err and "Last good checkpoint: none" in err
    assert "Traceback" not in err and not (out / "summary.json").exists()
