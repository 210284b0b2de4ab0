"""Averaging LoRA runs is averaging the models: the averaged adapter's merged weights are the mean of the runs'
merged weights (``cat`` exactly; ``svd`` exactly at the rank of the mean delta, with its truncation error reported
below it), while averaging the A and B factors themselves is not; and a pipeline round with ``average.checkpoints``
averages one DPO run's last checkpoints into the mean of their merged models. Also: the gate measures a base that
is a local model directory, as the pipeline's round 0 does for a model downloaded to disk."""

import pytest
import torch
from factories import make_run_dir

from finetune.pipeline import average_adapters
from finetune.run_dir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")


def merged_weights(run_dir) -> dict[str, torch.Tensor]:
    """The base with the run's adapter merged into it (``W + B A alpha / r``), as a state dict."""
    from peft import PeftModel

    from finetune.config import ModelConfig
    from finetune.models import load_base_model

    base = load_base_model(ModelConfig(), "lora", for_training=False)
    return PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return make_run_dir(root / "a", seed=0), make_run_dir(root / "b", seed=1)


@pytest.fixture(scope="module")
def mean_of_merged(two_runs):
    first, second = (merged_weights(run) for run in two_runs)
    return {key: (first[key] + second[key]) / 2 for key in first}


@pytest.mark.parametrize("combination, rank", [("cat", None), ("svd", 32)])
def test_averaged_adapter_merges_into_the_mean_of_the_two_merged_models(tmp_path, two_runs, mean_of_merged,
                                                                       combination, rank):
    """Two rank-16 adapters: their mean delta has rank <= 32, so cat (rank 16 + 16) and svd at rank 32 are exact."""
    out = tmp_path / combination
    figures = average_adapters(list(two_runs), out, combination, rank)
    assert figures["rank"] == 32 and figures["relative_error"] < 1e-5
    run = RunDir.read(out)
    assert run.finished and run.kind == "adapter" and run.adapter_shape()["r"] == 32 and run.template == "llama3"
    averaged = merged_weights(out)
    changed = [key for key in mean_of_merged if "proj" in key]
    assert changed
    for key in mean_of_merged:
        torch.testing.assert_close(averaged[key], mean_of_merged[key], atol=2e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def svd_average(tmp_path_factory, two_runs):
    out = tmp_path_factory.mktemp("average") / "avg"
    return out, average_adapters(list(two_runs), out, "svd", None)


def test_svd_at_the_runs_rank_keeps_the_shape_and_reports_what_it_cut(svd_average):
    out, figures = svd_average
    assert figures["rank"] == 16 and RunDir.read(out).adapter_shape()["r"] == 16
    assert 0.01 < figures["relative_error"] < 1  # two unrelated random adapters: the mean delta has rank 32


def test_the_averaged_adapter_has_a_card_naming_the_runs_it_is_the_mean_of(svd_average, two_runs):
    """What ``finetune push`` uploads and a reader of the pipeline's final model sees: not "a LoRA adapter" of the
    first run's data, but the mean of which runs, how, and the chain from there; never the staging directory."""
    out, _ = svd_average
    card = (out / "README.md").read_text()
    first, second = two_runs
    assert f"the mean of 2 adapters' merged weight deltas (`svd`, rank 16) from `{first}`, `{second}`" in card
    assert f"`average ({out})` <- `mean of model ({first}), model ({second})` <- `base tiny`" in card
    assert ".staging" not in card


def test_averaging_the_factors_is_not_averaging_the_models(two_runs):
    """mean(B) mean(A) != mean(B A): for one layer of the two adapters the two differ by far more than rounding."""
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in two_runs)
    key_a = next(k for k in a if "q_proj.lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    mean_of_products = (a[key_b] @ a[key_a] + b[key_b] @ b[key_a]) / 2
    product_of_means = ((a[key_b] + b[key_b]) / 2) @ ((a[key_a] + b[key_a]) / 2)
    assert (product_of_means - mean_of_products).norm() > 0.3 * mean_of_products.norm()


# ---------------------------------------------------------------------------------------------------------------
# Averaging one run's last checkpoints (average.checkpoints)

DPO_SIX_STEPS = ("--dpo.overrides=[--train.max_steps=6, --train.per_device_batch_size=2, --train.logging_steps=1, "
                 "--train.save_steps=2, --train.save_total_limit=3, --train.warmup_ratio=0, --adapter.dropout=0, "
                 "--train.learning_rate=1e-3, --data.max_eval_samples=4, --eval.num_samples=4, "
                 "--eval.max_new_tokens=8, --eval.before_training=false]")


@pytest.fixture(scope="module")
def checkpoints_round(tmp_path_factory):
    """One round whose model is the mean of its one DPO run's last three checkpoints (steps 2, 4 and 6)."""
    import recipe_runs
    from factories import PIPELINE_QUICK

    from finetune.config import PipelineRunConfig

    out = tmp_path_factory.mktemp("pipeline") / "checkpoints"
    quick = [arg for arg in PIPELINE_QUICK if not arg.startswith("--dpo.overrides")]
    argv = ["--output_dir", str(out), *quick, DPO_SIX_STEPS, "--rounds=1", "--average.runs=1",
            "--average.checkpoints=3", "--average.combination=cat"]
    assert recipe_runs.run_recipe("pipeline", PipelineRunConfig, argv) == 0
    return out


def test_one_runs_last_checkpoints_average_into_the_mean_of_their_merged_models(checkpoints_round):
    import json

    rdir = checkpoints_round / "round-1"
    run = rdir / "dpo" / "seed-10"
    checkpoints = [run / f"checkpoint-{step}" for step in (2, 4, 6)]
    manifest = json.loads((rdir / "manifest.json").read_text())
    average = manifest["stages"]["average"]
    assert average["directories"] == [str(c) for c in checkpoints] and average["runs"] == [str(run)]
    assert average["checkpoints"] == 3 and average["rank"] == 3 * RunDir.read(run).adapter_shape()["r"]
    assert manifest["candidate"] == str(rdir / "average") and {"dpo_1", "average"} <= set(manifest["figures"])
    averaged_run = RunDir.read(rdir / "average")
    assert averaged_run.finished and averaged_run.template == "llama3" and (rdir / "average" / "tokenizer.json").is_file()
    assert not (rdir / "average" / "optimizer.pt").exists()  # the run's files, not a checkpoint's trainer state

    # A DPO checkpoint holds the policy at its top (the reference in ref/): at step 6 it is the run's final adapter.
    from safetensors.torch import load_file

    final = load_file(str(run / "adapter_model.safetensors"))
    last = load_file(str(checkpoints[2] / "adapter_model.safetensors"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)

    merged = [merged_weights(c) for c in checkpoints]
    mean = {key: sum(m[key] for m in merged) / 3 for key in merged[0]}
    averaged = merged_weights(rdir / "average")
    for key in mean:
        torch.testing.assert_close(averaged[key], mean[key], atol=2e-6, rtol=1e-5)
    # The checkpoints differ, so the mean is none of them (and not the run's final adapter, step 6).
    moved = max((merged[2][key] - merged[0][key]).abs().max().item() for key in mean)
    assert moved > 1e-4
    assert max((averaged[key] - merged[2][key]).abs().max().item() for key in mean) > moved / 10


def test_a_base_in_a_local_model_directory_is_measured_with_its_runs_template(two_runs, tmp_path):
    """A downloaded model directory holds weights but no ``config.yaml``/``run.json``: it is the base, and takes its
    template from the run that trained on it (it used to be read as a run of template ``None``)."""
    from types import SimpleNamespace

    from finetune.pipeline import measure
    from finetune.tiny import tiny_model_dir

    lines = '{"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}\n'
    data = tmp_path / "gate.jsonl"
    data.write_text(lines * 2)
    gate = SimpleNamespace(data=str(data), split=None, max_samples=None, verifier="finetune.suite:verify",
                           max_new_tokens=4, batch_size=2)
    figures = measure(tiny_model_dir(), gate, template_from=two_runs[0])
    assert figures["num_prompts"] == 2 and figures["eval_loss"] > 0
