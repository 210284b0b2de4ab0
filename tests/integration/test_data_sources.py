"""Data read through the `datasets` library (save_to_disk directories, a hub id offline) and data that reaches
training: the readers' cases that need datasets or the tiny model (the readers' own tests are tests/unit)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_formats import DataFormatError, load_conversations

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data_formats" / "samples"
ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "task": "add", "answer": "5"}
MESSAGES = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello."}], "task": "greet"}


def check(call, file, record, field, *fragments):
    """``call()`` raises one DataFormatError with this location whose message holds every fragment."""
    with pytest.raises(DataFormatError) as info:
        call()
    e = info.value
    assert (e.file, e.record, e.field) == (str(file), record, field), str(e)
    for fragment in fragments:
        assert fragment in str(e), f"{fragment!r} not in {e}"
    return e


def test_datasets_save_to_disk_directories(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([MESSAGES]).save_to_disk(str(tmp_path / "single"))
    assert load_conversations(tmp_path / "single")[0].origin == f"{tmp_path / 'single'}[0]"

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_list([ALPACA, ALPACA]), test=datasets.Dataset.from_list([ALPACA])
    )
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_conversations(tmp_path / "dict")) == 2
    (conv,) = load_conversations(tmp_path / "dict", split="test")
    assert conv.origin == f"{tmp_path / 'dict'}:test[0]" and conv.meta == {"task": "add", "answer": "5"}
    with pytest.raises(DataFormatError, match="one of train, test") as info:
        load_conversations(tmp_path / "dict", split="validation")
    assert (info.value.file, info.value.record, info.value.field) == (str(tmp_path / "dict"), None, None)


def test_sft_run_with_skip_invalid_trains_on_the_valid_records(tmp_path, capsys):
    """The whole path: ``--data.skip_invalid=true`` trains, prints the counts and leaves rejects.jsonl."""
    import recipe_runs

    from finetune.config import SFTRunConfig

    good = (SAMPLES / "suite_messages_train.jsonl").read_text().splitlines()[:8]
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join([*good[:4], '{"messages": []}', *good[4:], "{oops"]) + "\n")
    out = tmp_path / "run"
    argv = ["--output_dir", str(out), f"--data.train={data}", "--data.eval=null", "--data.skip_invalid=true",
            "--train.max_steps=1", "--train.per_device_batch_size=2", "--eval.num_samples=1"]
    assert recipe_runs.run_recipe("sft", SFTRunConfig, argv) == 0
    printed = capsys.readouterr().out
    assert f"train data: 8 of 10 records from {data}; skipped 2 invalid" in printed
    origins = [json.loads(line)["origin"] for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert origins == [f"{data}:5", f"{data}:10"]
    assert recipe_runs.run_recipe("sft", SFTRunConfig, [*argv[:-5], "--data.skip_invalid=false", "--overwrite",
                                                     "--train.max_steps=1"]) == 2
    assert "mixed.jsonl, line 5, field 'messages'" in capsys.readouterr().err


def test_hub_dataset_offline_with_real_datasets(tmp_path):
    pytest.importorskip("datasets")
    code = (
        "from data_formats import load_conversations, DataFormatError\n"
        "try:\n    load_conversations('nobody-here/no-such-dataset')\n"
        "except DataFormatError as e:\n    print(e.file, e.record, e.field, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert result.stdout.startswith("nobody-here/no-such-dataset None None "), result.stdout + result.stderr
    assert "could not be fetched" in result.stdout and "work offline" in result.stdout


def test_datasets_dir_missing_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(test=datasets.Dataset.from_list([ALPACA])).save_to_disk(str(tmp_path / "dd"))
    check(
        lambda: load_conversations(tmp_path / "dd"), tmp_path / "dd", None, None, "a split named one of test", "'train'"
    )
