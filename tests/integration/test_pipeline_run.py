"""The rounds pipeline end to end on a reduced budget (tiny model, a few steps per stage): the round directories,
manifests, gate and summary it leaves; ``--resume`` after a SIGKILL inside round 2's DPO ends with the same figures
as the uninterrupted run; and two CPU processes (cpu_ddp) run it as one does, writing everything once."""

import json
import sys
from pathlib import Path

import pytest
from factories import PIPELINE_QUICK, launch_recipe
from recipe_processes import ROOT, checkpoint_complete, run_to_end, run_until

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = str(ROOT / "recipes" / "pipeline.py")
HERE = Path(__file__).resolve().parent

QUICK = PIPELINE_QUICK


@pytest.fixture(autouse=True)
def scorer_on_path(monkeypatch):
    """The recipe subprocesses import this module's scorer."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))


def command(out, *extra):
    return [sys.executable, RECIPE, "--output_dir", str(out), *QUICK, *extra]


def read(path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("pipeline") / "run"
    path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), path])  # module scope: monkeypatch is per test
    try:
        output = run_to_end(command(out), timeout=900)
    finally:
        os.environ["PYTHONPATH"] = path
    return out, output


def test_rounds_leave_manifests_gate_decisions_and_a_summary(uninterrupted):
    out, output = uninterrupted
    for name in ("summary.json", "summary.md", "figures.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert read(out / "run.json")["status"] == "finished"
    zero, first, second = (read(out / f"round-{n}" / "manifest.json") for n in range(3))
    assert zero["model"] == str(out / "round-0" / "sft") and {"base", "sft"} <= set(zero["figures"])
    assert first["incumbent"] == zero["model"] and second["incumbent"] == first["model"]
    for n, manifest in ((1, first), (2, second)):
        rdir = out / f"round-{n}"
        runs = [rdir / "dpo" / f"seed-{10 * n}", rdir / "dpo" / f"seed-{10 * n + 1}"]
        assert [Path(r["run_dir"]) for r in manifest["stages"]["dpo"]] == runs
        for run in (rdir / "rejection_sampling", rdir / "rejection_sampling" / "sft", *runs, rdir / "average"):
            assert read(run / "run.json")["status"] == "finished", run
        # DPO's pairs are the round's own samples, its reference and start this round's SFT model.
        dpo_config = (runs[0] / "config.yaml").read_text()
        assert str(rdir / "rejection_sampling" / "pairs.jsonl") in dpo_config
        assert f"init: {rdir / 'rejection_sampling' / 'sft'}" in dpo_config
        train_data = read(runs[0] / "summary.json")["train_data"]  # rejected replies cut at their first difference
        assert "rejected_to_first_difference: true" in dpo_config and train_data["rejected_cut_records"] > 0
        average = manifest["stages"]["average"]
        assert average["runs"] == [str(r) for r in runs] and average["rank"] == 16 and average["relative_error"] < 0.05
        figures = manifest["figures"]
        assert figures["candidate"]["model"] == str(rdir / "average")
        better = figures["candidate"]["eval_loss"] < figures["incumbent"]["eval_loss"]
        assert manifest["promoted"] == better and manifest["model"] == (
            str(rdir / "average") if better else manifest["incumbent"])
        assert manifest["reason"].startswith("eval loss") and set(manifest["seconds"]) >= {"rejection_sampling", "gate"}
    summary = read(out / "summary.json")
    assert [row["round"] for row in summary["rounds"]] == [0, 1, 2] and summary["model"] == second["model"]
    assert "| round |" in output  # the recipe prints the table at the end, then where it ended
    assert f"final model: {summary['model']} (" in output and f"finetune chat {summary['model']}" in output


def test_resume_after_finishing_runs_nothing_again(uninterrupted, tmp_path):
    out, _ = uninterrupted
    before = read(out / "summary.json")
    seconds = read(out / "round-1" / "manifest.json")["seconds"]
    output = run_to_end(command(out, "--resume"), timeout=600)
    assert output.count("finished; skipped") == 1 + 2 * 3  # the SFT run, then per round RS and the two DPO runs
    assert "starting from the beginning" not in output  # the pipeline has no checkpoints of its own; it skipped all
    after = read(out / "summary.json")
    assert after["rounds"] == before["rounds"]
    # A skipped step keeps the seconds its first run took (plus the moment it took to skip it).
    again = read(out / "round-1" / "manifest.json")["seconds"]
    assert again.keys() == seconds.keys() and all(again[k] >= seconds[k] for k in seconds)
    assert again["rejection_sampling"] < seconds["rejection_sampling"] + 5


def test_a_pipeline_that_failed_before_its_first_stage_restarts_on_a_plain_rerun(uninterrupted, tmp_path, capfd):
    """Nothing to resume (no round-0/ yet): the same command again gives the same one-line error, not "not empty"."""
    from finetune.config import PipelineRunConfig
    from finetune.launch import EXIT_USER_ERROR, launch, pipeline_main

    reference, _ = uninterrupted
    out, missing = tmp_path / "out", tmp_path / "gate.jsonl"
    argv = ["--output_dir", str(out), "--init", str(reference / "round-0" / "sft"), f"--gate.data={missing}",
            "--gate.metric=eval_loss"]
    for _ in range(2):
        assert launch(PipelineRunConfig, pipeline_main, argv) == EXIT_USER_ERROR
        assert f"error: {missing}: expected an existing file" in capfd.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == ["config.yaml", "run.json"]


def test_an_init_the_stage_configs_disagree_with_fails_before_anything_is_written(uninterrupted, tmp_path, capfd):
    """The first stage would refuse the start (another template here; another base model alike), but only after
    round 0 had measured the base: the pipeline asks it first."""
    from finetune.config import PipelineRunConfig
    from finetune.launch import EXIT_USER_ERROR, launch, pipeline_main

    reference, _ = uninterrupted
    out, init = tmp_path / "out", reference / "round-0" / "sft"
    argv = ["--output_dir", str(out), "--init", str(init), "--rejection_sampling.overrides=[--data.template=chatml]"]
    assert launch(PipelineRunConfig, pipeline_main, argv) == EXIT_USER_ERROR
    assert f"error: init {init}: --init {init} was trained with template 'llama3'" in capfd.readouterr().err
    assert not out.exists()


def test_sigkill_inside_round_two_then_resume_ends_with_the_uninterrupted_figures(uninterrupted, tmp_path):
    reference, _ = uninterrupted
    killed = tmp_path / "killed"
    run_until(command(killed), checkpoint_complete(killed / "round-2" / "dpo" / "seed-20", 2), timeout=900)
    assert not (killed / "round-2" / "manifest.json").is_file() or "promoted" not in read(
        killed / "round-2" / "manifest.json")
    output = run_to_end(command(killed, "--resume"), timeout=900)
    assert f"pipeline: resuming {killed / 'round-2' / 'dpo' / 'seed-20'}" in output
    assert f"pipeline: {killed / 'round-1' / 'dpo' / 'seed-11'} finished; skipped" in output
    ours, theirs = read(killed / "summary.json")["rounds"], read(reference / "summary.json")["rounds"]
    assert [(r["round"], r["promoted"]) for r in ours] == [(r["round"], r["promoted"]) for r in theirs]
    for mine, other in zip(ours, theirs):
        assert mine.keys() == other.keys()
        for key in mine:
            if key.endswith("/eval_loss"):
                assert mine[key] == pytest.approx(other[key], rel=1e-4), key
            elif key.endswith("/accuracy"):
                assert mine[key] == other[key], key


def test_two_cpu_processes_run_the_pipeline_and_write_each_run_once(tmp_path):
    out = tmp_path / "ddp"
    launch_recipe("pipeline.py", 2, ["--output_dir", str(out), *QUICK, "--rounds=1"], timeout=900)
    manifest = read(out / "round-1" / "manifest.json")
    assert manifest["figures"]["candidate"]["num_prompts"] == 6  # both processes' halves of the gate prompts
    for run in (out / "round-1" / "rejection_sampling" / "sft", out / "round-1" / "dpo" / "seed-10"):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        assert lines and len(lines) == len(set(lines)), run  # one process logs each row
    assert read(out / "run.json")["status"] == "finished" and (out / "summary.md").is_file()
