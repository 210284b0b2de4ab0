"""Running a recipe in a real subprocess for kill-and-resume tests: run it to the end, or SIGKILL it the moment a
condition holds (e.g. a checkpoint is complete), then read what it logged.

Output goes to a temporary file, not a pipe: a chatty run would otherwise fill the pipe while the test polls and
block before the condition is ever met.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe_env(**extra: str) -> dict[str, str]:
    """Offline, unbuffered, one thread per process unless the caller says otherwise, and tests/ importable (test
    scorers such as ``toy_verifiers:shortness`` live there)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": path, **extra}


def _start(cmd: Sequence[str], log) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], env=recipe_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _read(log) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")


def run_to_end(cmd: Sequence[str], timeout: float = 600) -> str:
    """Run ``cmd`` to completion; assert it succeeded and return its output (stdout and stderr together)."""
    with tempfile.TemporaryFile() as log:
        proc = _start(cmd, log)
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        output = _read(log)
    assert proc.returncode == 0, output[-5000:]
    return output


def run_until(cmd: Sequence[str], predicate: Callable[[], bool], timeout: float = 300, poll: float = 0.02) -> str:
    """Start ``cmd``, SIGKILL it as soon as ``predicate()`` is true, and return its output so far. Fails if the process
    exits first (the kill must interrupt it) or the predicate is not met within ``timeout`` seconds."""
    with tempfile.TemporaryFile() as log:
        proc = _start(cmd, log)
        deadline = time.monotonic() + timeout
        try:
            while not predicate():
                assert proc.poll() is None, f"exited ({proc.returncode}) before the kill:\n{_read(log)[-5000:]}"
                assert time.monotonic() < deadline, f"condition not met in {timeout}s:\n{_read(log)[-5000:]}"
                time.sleep(poll)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        return _read(log)


def checkpoint_complete(output_dir: Path, step: int) -> Callable[[], bool]:
    """A ``run_until`` predicate: ``checkpoint-STEP`` of ``output_dir`` carries its completion marker."""
    from finetune.runs import CHECKPOINT_COMPLETE

    marker = Path(output_dir) / f"checkpoint-{step}" / CHECKPOINT_COMPLETE
    return marker.is_file


def losses_by_step(output_dir: Path) -> dict[int, float]:
    """Training loss per logged step from ``metrics.jsonl`` (a resumed run rewinds the file to its checkpoint, so
    each step has one row)."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
