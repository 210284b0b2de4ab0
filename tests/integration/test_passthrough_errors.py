"""A bad ``trainer.*`` key or ``report_to`` under a recipe: one line, exit status 2, the output directory untouched
(the check runs before the data loads and before the run directory is prepared)."""

import pytest
import recipe_runs

from finetune.config import DPORunConfig, SFTRunConfig


@pytest.mark.parametrize("argv, line", [
    (["--trainer.learning_rate=1e-4"], "error: trainer.learning_rate is set by train.learning_rate; set that instead"),
    (["--trainer.save_stratgy=epoch"], "error: unknown config key 'trainer.save_stratgy': not a field of "
                                       "trl.SFTConfig; did you mean 'trainer.save_strategy'?"),
    (["--trainer.eval_strategy=sometimes"], "error: trl.SFTConfig refused trainer.eval_strategy='sometimes': "),
])
def test_sft_refuses_before_anything_is_written(tmp_path, capsys, argv, line):
    out = tmp_path / "run"
    assert recipe_runs.run_recipe("sft", SFTRunConfig, ["--output_dir", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(line) and not out.exists()


def test_dpo_refuses_a_tracker_that_is_not_installed(tmp_path, capsys, monkeypatch):
    import transformers.integrations.integration_utils as integrations
    from factories import make_sft_run

    monkeypatch.setattr(integrations, "get_available_reporting_integrations", lambda: ["tensorboard"])
    sft_run = make_sft_run(tmp_path / "sft")
    out = tmp_path / "dpo"
    argv = ["--init", str(sft_run), "--output_dir", str(out), "--train.report_to=tensorboard,mlflow"]
    assert recipe_runs.run_recipe("dpo", DPORunConfig, argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: train.report_to: mlflow is not installed (pip install mlflow)")
    assert not out.exists()
