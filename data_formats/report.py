"""What a load read, changed and skipped: counts per reason, and the skipped records by name for a rejects file."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .canonical import DataFormatError

# conversations[12].value and conversations[3].value are the same reason.
_INDEX = re.compile(r"\[\d+\]")


def reason(error: DataFormatError) -> str:
    """The kind of problem, without the record's own values: ``field 'conversations[].value': expected ...``."""
    where = f"field '{_INDEX.sub('[]', error.field)}': " if error.field else ""
    return f"{where}expected {error.expected}"


@dataclass
class LoadReport:
    """Counts of one load; filled in by :func:`data_formats.load_conversations` and ``load_preferences``.

    Attributes:
        source: The source's display name.
        records: Records read from the source (accepted and skipped).
        accepted: Records that became canonical records.
        changes: Per change a reader made to accepted records (e.g. ``dropped a leading assistant turn``), how many.
        skipped: Per reason (see :func:`reason`), how many records ``skip_invalid`` skipped.
        rejects: ``(origin, reason, message)`` per skipped record, in order: ``origin`` is ``file:line`` or
            ``file[index]``, ``message`` the full one-line error.
    """

    source: str = ""
    records: int = 0
    accepted: int = 0
    changes: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    rejects: list[tuple[str, str, str]] = field(default_factory=list)
    _pending: Counter = field(default_factory=Counter, repr=False)

    def note(self, change: str) -> None:
        """Count a change to the record being read; it counts once the record is accepted."""
        self._pending[change] += 1

    def accept(self) -> None:
        """The record being read was accepted: its changes count."""
        self.accepted += 1
        self.changes.update(self._pending)
        self._pending.clear()

    def reject(self, origin: str, error: DataFormatError) -> None:
        """The record being read was skipped for ``error``: count it by reason and keep its name."""
        why = reason(error)
        self.skipped[why] += 1
        self.rejects.append((origin, why, str(error)))
        self._pending.clear()

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def describe(self, name: str = "data") -> str:
        """One line: ``train data: 17,671 of 17,672 records from X (dropped a leading assistant turn: 6,358); ...``."""
        text = f"{name}: {self.accepted} of {self.records} records from {self.source}"
        if self.changes:
            text += " (" + "; ".join(f"{what}: {n}" for what, n in self.changes.most_common()) + ")"
        if self.skipped:
            text += f"; skipped {self.num_skipped} invalid: " + "; ".join(
                f"{n} x {why}" for why, n in self.skipped.most_common()
            )
        return text

    def as_dict(self) -> dict:
        """The counts (not the rejects) as plain JSON for a run's summary."""
        return {
            "source": self.source,
            "records": self.records,
            "accepted": self.accepted,
            "changes": dict(self.changes),
            "skipped": dict(self.skipped),
        }


def write_rejects(path, reports: list[LoadReport]) -> int:
    """Write every skipped record of ``reports`` as JSON Lines ``{"origin", "reason", "error"}``; returns the count.

    Written to a temporary file that replaces ``path``, so a rerun never appends to an old list.
    """
    path = Path(os.fspath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for report in reports:
            for origin, why, message in report.rejects:
                f.write(json.dumps({"origin": origin, "reason": why, "error": message}, ensure_ascii=False) + "\n")
                count += 1
    os.replace(tmp, path)
    return count
