"""Where every benchmark leaves its figures: the results as JSON and the readable table beside it as Markdown."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(json_path: Path, results: dict, text: str) -> None:
    """``results`` to ``json_path`` and ``text`` (the table) to the same name with ``.md``, creating the folder."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(text + "\n")
