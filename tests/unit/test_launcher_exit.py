"""The launcher hook's pure parts: which processes are launchers, and which failures are a child's user error."""

import json
import logging
import subprocess

import pytest

from finetune.launcher_exit import HeldElasticLines, is_launcher, report_in_child, user_error_line


@pytest.mark.parametrize(
    "argv, launcher",
    [
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "recipes/sft.py"], True),
        (["/venv/bin/python", "/venv/bin/accelerate", "config"], False),
        (["/venv/bin/python", "/venv/bin/accelerate-launch", "recipes/sft.py"], True),
        (["/venv/bin/python", "/venv/bin/torchrun", "--nproc_per_node", "2", "recipes/sft.py"], True),
        (["python", "-u", "-m", "accelerate.commands.launch", "recipes/sft.py"], True),
        (["python", "-m", "accelerate.commands.accelerate_cli", "launch", "x.py"], True),
        (["python", "-m", "accelerate.commands.accelerate_cli", "env"], False),
        (["python", "-m", "torch.distributed.run", "x.py"], True),
        (["python", "recipes/sft.py", "launch"], False),
        (["python", "-c", "pass"], False),
        (["python"], False),
    ],
)
def test_is_launcher(argv, launcher):
    assert is_launcher(argv) is launcher


class FakeFailure:
    def __init__(self, exitcode, message):
        self.exitcode, self.message = exitcode, message


class FakeChildFailedError(Exception):
    """The two things the hook reads from torch elastic's ChildFailedError."""

    def __init__(self, exitcode, message):
        self.failure = FakeFailure(exitcode, message)

    def get_first_failure(self):
        return 0, self.failure


def test_user_error_line():
    assert user_error_line(subprocess.CalledProcessError(2, ["python", "x.py"])) == ""  # the child printed it
    assert user_error_line(subprocess.CalledProcessError(1, ["python", "x.py"])) is None
    assert user_error_line(FakeChildFailedError(2, "error: bad")) == "error: bad"
    assert user_error_line(FakeChildFailedError(2, {"message": "Traceback ..."})) == ""
    assert user_error_line(FakeChildFailedError(-15, "Signal 15")) is None
    assert user_error_line(FakeChildFailedError(1, "error: bad")) is None
    assert user_error_line(ValueError("x")) is None


def test_report_goes_to_the_elastic_error_file_when_there_is_one(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    report_in_child("error: one")
    assert capsys.readouterr().err == "error: one\n"
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    report_in_child("error: two")
    assert capsys.readouterr().err == ""
    assert json.loads(error_file.read_text())["message"] == "error: two"


def test_closing_signal_lines_are_dropped_with_a_user_error_and_kept_otherwise():
    logger = logging.getLogger("test_launcher_exit.elastic")
    logger.propagate = False
    seen = []

    class Collect(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger.addHandler(Collect())
    logger.addFilter(HeldElasticLines(logger))
    logger.warning("Sending process %s closing signal %s", 11, "SIGTERM")
    logger.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 2, 1, 12, "python")
    assert seen == []
    logger.warning("Sending process %s closing signal %s", 11, "SIGTERM")
    logger.error("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", 1, 1, 12, "python")
    assert seen == ["Sending process 11 closing signal SIGTERM", "failed (exitcode: 1) local_rank: 1 (pid: 12) of binary: python"]
