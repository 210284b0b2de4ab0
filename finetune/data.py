"""From a data source to tokenised training rows, counting everything that is cut or skipped.

Reading and validation are ``data_formats``' job; this module resolves the toolkit's source names, renders each
conversation through the chat template and truncates to the configured length, and reports what that cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import data_formats

BUNDLED_PREFIX = "bundled:"
SAMPLES_DIR = Path(data_formats.__file__).resolve().parent / "samples"
REJECTS_FILE = "rejects.jsonl"
"""Where a run lists the records ``data.skip_invalid`` skipped, in its output directory."""


def bundled_files() -> list[str]:
    """The names ``bundled:NAME`` accepts: the data files shipped in ``data_formats/samples``."""
    return sorted(p.name for p in SAMPLES_DIR.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))


def resolve_source(source: str) -> str:
    """``bundled:FILE`` -> the shipped sample file (a plain file name, never a path out of the samples); anything
    else unchanged."""
    if source.startswith(BUNDLED_PREFIX):
        name = source[len(BUNDLED_PREFIX) :]
        shipped = bundled_files()
        if name not in shipped:
            raise data_formats.DataFormatError(
                source, None, None, "bundled:NAME with NAME one of the bundled files: " + ", ".join(shipped)
            )
        return str(SAMPLES_DIR / name)
    return source


def load_conversations(
    source: str,
    format: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
    reports: list | None = None,
    name: str = "data",
):
    """Conversations from any source the config accepts (see ``DataConfig.train``), read only as far as ``limit``.

    Args:
        source: A path, hub id or ``bundled:FILE``.
        format: As ``data.format``.
        split: As ``data.split``.
        limit: Read only the first N accepted records.
        skip_invalid: As ``data.skip_invalid``: skip malformed records, counted per reason.
        reports: A list the load's :class:`data_formats.LoadReport` is appended to, for :func:`write_rejects`.
        name: How the printed report line names the data (``train data``).
    """
    report = data_formats.LoadReport()
    conversations = data_formats.load_conversations(
        resolve_source(source), format=format, split=split, limit=limit, skip_invalid=skip_invalid, report=report
    )
    _report(report, name, reports)
    return conversations


def load_preferences(
    source: str,
    format: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
    reports: list | None = None,
    name: str = "data",
):
    """Preference pairs from any source the config accepts; arguments as for :func:`load_conversations`."""
    report = data_formats.LoadReport()
    pairs = data_formats.load_preferences(
        resolve_source(source), format=format, split=split, limit=limit, skip_invalid=skip_invalid, report=report
    )
    _report(report, name, reports)
    return pairs


def load_unpaired(
    source: str,
    format: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    *,
    skip_invalid: bool = False,
    reports: list | None = None,
    name: str = "data",
):
    """Unpaired examples (KTO's data) from any source the config accepts, pairs split into one desirable and one
    undesirable example; arguments as for :func:`load_conversations`."""
    report = data_formats.LoadReport()
    examples = data_formats.load_unpaired(
        resolve_source(source), format=format, split=split, limit=limit, skip_invalid=skip_invalid, report=report
    )
    _report(report, name, reports)
    return examples


def _report(report, name: str, reports: list | None) -> None:
    # Only a load that changed or skipped something needs a line; the token report counts the rest.
    if report.changes or report.skipped:
        print(report.describe(name))
    if reports is not None:
        reports.append(report)


def write_rejects(output_dir, reports: list) -> Path | None:
    """List the records the loads behind ``reports`` skipped in ``OUTPUT_DIR/rejects.jsonl`` (``origin``,
    ``reason``, ``error`` per line); returns the path, or ``None`` (and no file) when nothing was skipped."""
    if not any(report.rejects for report in reports):
        return None
    path = Path(output_dir) / REJECTS_FILE
    count = data_formats.write_rejects(path, reports)
    print(f"{count} skipped records listed in {path}")
    return path


@dataclass
class TokenReport:
    """What tokenisation kept, cut and skipped; printed by the recipes and stored in ``summary.json``."""

    records: int = 0
    """Conversations read."""
    kept: int = 0
    """Conversations that became training rows."""
    tokens: int = 0
    """Tokens kept."""
    trained_tokens: int = 0
    """Kept tokens that carry a loss (assistant tokens)."""
    truncated_records: int = 0
    """Conversations longer than max_length, cut to it."""
    truncated_tokens: int = 0
    """Tokens removed by that cut."""
    skipped_records: int = 0
    """Conversations with no trained token left after the cut (the assistant reply lay beyond max_length)."""
    untrained_records: int = 0
    """Conversations whose every assistant reply has ``"weight": 0``: nothing to train, skipped."""
    skipped_origins: list[str] = field(default_factory=list)
    """Where the skipped conversations came from (file:line), the first 20."""

    def describe(self, name: str) -> str:
        text = (
            f"{name}: {self.kept}/{self.records} conversations, {self.tokens} tokens ({self.trained_tokens} trained); "
            f"{self.truncated_records} truncated (-{self.truncated_tokens} tokens), {self.skipped_records} skipped"
        )
        if self.skipped_origins:
            text += f" (no trained token within max_length: {', '.join(self.skipped_origins[:5])}"
            text += ", ...)" if self.skipped_records > 5 else ")"
        if self.untrained_records:
            text += f", {self.untrained_records} skipped with every reply at weight 0"
        return text

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "skipped_origins"}


def tokenize_conversations(conversations, template, tokenizer, max_length: int) -> tuple[list[dict], TokenReport]:
    """Render and truncate each conversation: rows of ``{"input_ids", "labels"}`` plus a :class:`TokenReport`.

    Truncation keeps the start (the prompt and the beginning of the reply). A conversation left with no trained
    token cannot contribute to the loss and is skipped, but counted and named, never dropped silently; so is one
    whose every reply has ``"weight": 0``. A conversation the template cannot render is an error naming its origin.
    """
    from data_formats import DataFormatError

    from .templates import TemplateError, get_template, render, stop_token_ids

    template = get_template(template, tokenizer)
    stop_token_ids(template, tokenizer)  # a template this tokenizer cannot express fails here, not on record 1
    rows: list[dict] = []
    report = TokenReport(records=len(conversations))
    for conv in conversations:
        try:
            input_ids, labels = render(template, conv.messages, tokenizer)
        except (TemplateError, DataFormatError) as error:
            raise TemplateError(f"{conv.origin}: {error}") from None
        if all(m.get("weight") == 0 for m in conv.messages if m["role"] == "assistant"):
            report.untrained_records += 1
            continue
        if len(input_ids) > max_length:
            report.truncated_records += 1
            report.truncated_tokens += len(input_ids) - max_length
            input_ids, labels = input_ids[:max_length], labels[:max_length]
        trained = sum(label != -100 for label in labels)
        if trained == 0:
            report.skipped_records += 1
            if len(report.skipped_origins) < 20:
                report.skipped_origins.append(conv.origin)
            continue
        rows.append({"input_ids": input_ids, "labels": labels})
        report.kept += 1
        report.tokens += len(input_ids)
        report.trained_tokens += trained
    return rows, report


def prompt_and_reference(conversation) -> tuple[list[dict], str, str]:
    """Split a conversation into (messages up to the last user turn, that user's text, the reference reply)."""
    messages = conversation.messages
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"{conversation.origin}: expected the conversation to end on an assistant turn")
    return messages[:-1], messages[-2]["content"], messages[-1]["content"]
