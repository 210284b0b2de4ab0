"""Averaging LoRA runs is averaging the models: the averaged adapter's merged weights are the mean of the runs'
merged weights (``cat`` exactly; ``svd`` exactly at the rank of the mean delta, with its truncation error reported
below it), while averaging the A and B factors themselves is not."""

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


def test_svd_at_the_runs_rank_keeps_the_shape_and_reports_what_it_cut(tmp_path, two_runs, mean_of_merged):
    figures = average_adapters(list(two_runs), tmp_path / "avg", "svd", None)
    assert figures["rank"] == 16 and RunDir.read(tmp_path / "avg").adapter_shape()["r"] == 16
    assert 0.01 < figures["relative_error"] < 1  # two unrelated random adapters: the mean delta has rank 32


def test_averaging_the_factors_is_not_averaging_the_models(two_runs):
    """mean(B) mean(A) != mean(B A): for one layer of the two adapters the two differ by far more than rounding."""
    from safetensors.torch import load_file

    a, b = (load_file(str(run / "adapter_model.safetensors")) for run in two_runs)
    key_a = next(k for k in a if "q_proj.lora_A" in k)
    key_b = key_a.replace("lora_A", "lora_B")
    mean_of_products = (a[key_b] @ a[key_a] + b[key_b] @ b[key_a]) / 2
    product_of_means = ((a[key_b] + b[key_b]) / 2) @ ((a[key_a] + b[key_a]) / 2)
    assert (product_of_means - mean_of_products).norm() > 0.3 * mean_of_products.norm()
