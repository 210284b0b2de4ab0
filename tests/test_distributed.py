"""Scale-out: every accelerate config parses, and 2 CPU processes (DDP) train exactly like 1 with the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_sft(out: Path, processes: int, accumulation: int, extra=()):
    """recipes/sft.py under accelerate with N CPU processes; global batch = 2 x accumulation x processes."""
    if processes == 1:
        launcher = [str(ACCELERATE), "launch", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no"]
    else:
        launcher = [str(ACCELERATE), "launch", "--config_file", str(ROOT / "accelerate_configs" / "cpu_ddp.yaml"),
                    "--num_processes", str(processes), "--main_process_port", str(free_port())]
    args = [
        "--output_dir", str(out),
        "--data.max_train_samples=96", "--data.max_eval_samples=12", "--data.max_length=128",
        "--train.max_steps=4", "--train.per_device_batch_size=2", f"--train.gradient_accumulation_steps={accumulation}",
        "--train.logging_steps=1", "--train.save_steps=4", "--train.learning_rate=5e-3",
        "--adapter.dropout=0", "--eval.num_samples=6", *extra,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*launcher, str(ROOT / "recipes" / "sft.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def losses(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_sft_two_processes_equal_one(tmp_path):
    """Global batch 4 both ways: 1 process x batch 2 x accumulation 2, and 2 processes x batch 2. Same packed rows,
    the token-mean loss over the global batch (token counts gathered across processes), so the same loss at every
    step and the same adapter at the end. Verifier accuracy is gathered over both processes' halves of the prompts."""
    import torch
    from safetensors.torch import load_file

    one = tmp_path / "one"
    two = tmp_path / "two"
    launch_sft(one, processes=1, accumulation=2)
    launch_sft(two, processes=2, accumulation=1)
    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    a = load_file(one / "adapter_model.safetensors")
    b = load_file(two / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["eval_accuracy"] == s2["eval_accuracy"]
    assert s2["eval_loss"] == pytest.approx(s1["eval_loss"], rel=1e-4)
