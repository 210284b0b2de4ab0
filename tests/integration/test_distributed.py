"""Scale-out: every accelerate config parses, and 2 CPU processes (DDP) train exactly like 1 with the same global batch."""

import json
import sys
from pathlib import Path

import pytest
from factories import launch_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
ACCELERATE = Path(sys.executable).with_name("accelerate")


def test_every_accelerate_config_parses_with_accelerates_loader():
    from accelerate.commands.config.config_args import load_config_from_file

    names = {p.stem for p in CONFIGS}
    assert {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multi_node", "cpu_ddp"} <= names
    for path in CONFIGS:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path
        assert "accelerate launch --config_file accelerate_configs/" in path.read_text(), f"{path.name}: launch line"
    fsdp = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"






def launch_sft(out: Path, processes: int, accumulation: int, extra=()):
    """recipes/sft.py under accelerate with N CPU processes; global batch = 2 x accumulation x processes."""
    args = [
        "--output_dir", str(out),
        "--data.max_train_samples=96", "--data.max_eval_samples=12", "--data.max_length=128",
        "--train.max_steps=4", "--train.per_device_batch_size=2", f"--train.gradient_accumulation_steps={accumulation}",
        "--train.logging_steps=1", "--train.save_steps=4", "--train.learning_rate=5e-3",
        "--adapter.dropout=0", "--eval.num_samples=6", *extra,
    ]
    return launch_recipe("sft.py", processes, args)


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_sft_two_processes_equal_one(tmp_path):
    """Global batch 4 both ways: 1 process x batch 2 x accumulation 2, and 2 processes x batch 2. Same packed rows,
    the token-mean loss over the global batch (token counts gathered across processes), so the same loss at every
    step and the same adapter at the end. Verifier accuracy is gathered over both processes' halves of the prompts."""
    one = tmp_path / "one"
    two = tmp_path / "two"
    launch_sft(one, processes=1, accumulation=2)
    launch_sft(two, processes=2, accumulation=1)
    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert_same_adapter(one, two)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["eval_accuracy"] == s2["eval_accuracy"]
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)


@pytest.fixture(scope="module")
def sft_init(tmp_path_factory):
    """A stand-in SFT run (a LoRA adapter with non-zero B) for the preference stages to start from."""
    from factories import make_sft_run

    return make_sft_run(tmp_path_factory.mktemp("sft_init"))


def assert_same_adapter(one: Path, two: Path) -> None:
    import torch
    from safetensors.torch import load_file

    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_dpo_two_processes_equal_one(tmp_path, sft_init):
    """DPO from the same SFT adapter, global batch 4 both ways (1 process x batch 2 x accumulation 2, 2 processes x
    batch 2). DPO's loss is a mean over the pairs of a micro-batch; accumulation averages the micro-batches and DDP
    averages the processes' gradients, so both see the same pairs per step and take the same steps: the same loss at
    every step, the same policy adapter, and the same held-out figures (eval pairs and verifier prompts split across
    the processes and gathered)."""

    def launch_dpo(out: Path, processes: int, accumulation: int):
        return launch_recipe("dpo.py", processes, [
            "--init", str(sft_init), "--output_dir", str(out),
            "--data.max_train_samples=32", "--data.max_eval_samples=8",
            "--train.max_steps=4", "--train.per_device_batch_size=2",
            f"--train.gradient_accumulation_steps={accumulation}", "--train.logging_steps=1", "--train.save_steps=4",
            "--train.learning_rate=5e-3", "--eval.num_samples=4", "--eval.max_new_tokens=8",
        ])

    one, two = tmp_path / "one", tmp_path / "two"
    launch_dpo(one, processes=1, accumulation=2)
    launch_dpo(two, processes=2, accumulation=1)
    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(one)[-1] != pytest.approx(losses(one)[0], rel=1e-3), "the policy moved"
    assert_same_adapter(one, two)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_reward_accuracy", "eval_reward_margin"):
        assert s2[key] == pytest.approx(s1[key], rel=1e-4, abs=1e-6), key
    assert s1["eval_accuracy"] == s2["eval_accuracy"]


def test_reward_runs_under_two_processes_and_writes_once(tmp_path, sft_init):
    """recipes/reward.py under cpu_ddp.yaml: it finishes, each logged step is in metrics.jsonl once (only the main
    process writes), and the summary is written and printed once."""
    out = tmp_path / "reward"
    proc = launch_recipe("reward.py", 2, [
        "--init", str(sft_init), "--output_dir", str(out), "--data.max_train_samples=16",
        "--data.max_eval_samples=4", "--train.max_steps=2", "--train.per_device_batch_size=2",
        "--train.logging_steps=1", "--train.save_steps=2",
    ])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_steps"] == 2 and isinstance(summary["eval_accuracy"], float)
    assert proc.stdout.splitlines().count(f"eval_accuracy: {summary['eval_accuracy']:.4f}") == 1, proc.stdout
    assert (out / "adapter_model.safetensors").is_file()
