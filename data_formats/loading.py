"""The entry points that tie a source to a reader: one format per file, every record checked against it."""

from __future__ import annotations

import os
from collections.abc import Iterator

from .canonical import Conversation, DataFormatError, Found, PreferencePair, UnpairedExample, Where, describe, unpair
from .readers import (
    CONVERSATION_FORMATS,
    FORMATS,
    PREFERENCE_FORMATS,
    READERS,
    REQUIRED_FIELDS,
    UNPAIRED_FORMATS,
    article,
    detect_format,
    guess_format,
)
from .report import LoadReport
from .sources import Source, open_source
from .values import check_value

USE_PREFERENCES = "use load_preferences for preference data"
USE_CONVERSATIONS = "use load_conversations for conversation data"


def load_conversations(
    source,
    format: str = "auto",
    split: str | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list[Conversation]:
    """Read instruction or chat data into canonical conversations.

    Files are streamed: one record (a JSON Lines line, an element of a JSON list, a CSV row, a parquet batch) is in
    memory at a time besides the conversations returned.

    Args:
        source: A ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, a ``datasets`` ``save_to_disk`` directory,
            a hub dataset id (``owner/name``), or a list of dicts.
        format: ``"auto"`` (detected from the first record), ``"alpaca"``, ``"sharegpt"`` or ``"messages"``.
        split: Split of a ``DatasetDict`` directory or hub dataset (default ``"train"``).
        limit: Stop after this many accepted records; the rest of the source is not read.
        skip_invalid: Skip a malformed record instead of raising, counting it per reason in ``report``. Problems
            with the source as a whole (missing, unreadable, not JSON at all) still raise.
        report: Filled in with what was read, changed (e.g. a ShareGPT conversation's leading ``gpt`` turn
            dropped) and skipped.

    Returns:
        One :class:`Conversation` per accepted record, in order.

    Raises:
        DataFormatError: On the first problem, naming file, record and field; also for preference data, and when
            ``skip_invalid`` leaves no record.
    """
    return _load(source, format, split, CONVERSATION_FORMATS, USE_PREFERENCES, limit, skip_invalid, report)


def load_preferences(
    source,
    format: str = "auto",
    split: str | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list[PreferencePair]:
    """Read preference data into canonical pairs.

    Args:
        source: As for :func:`load_conversations`.
        format: ``"auto"``, ``"preference"`` (prompt/chosen/rejected) or ``"hh"`` (Anthropic HH transcripts).
        split: As for :func:`load_conversations`.
        limit: As for :func:`load_conversations`.
        skip_invalid: As for :func:`load_conversations`.
        report: As for :func:`load_conversations`.

    Returns:
        One :class:`PreferencePair` per accepted record, in order.

    Raises:
        DataFormatError: On the first problem, naming file, record and field; also for conversation data and for
            unpaired data (which has no pairs to give).
    """
    return _load(source, format, split, PREFERENCE_FORMATS, USE_CONVERSATIONS, limit, skip_invalid, report)


def load_unpaired(
    source,
    format: str = "auto",
    split: str | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list[UnpairedExample]:
    """Read unpaired preference data (KTO's) into canonical examples; preference pairs are accepted and split.

    Args:
        source: As for :func:`load_conversations`.
        format: ``"auto"``, ``"unpaired"`` (prompt/completion/label, TRL's unpaired preference format), or a pair
            format, ``"preference"`` or ``"hh"``: each pair becomes its chosen reply, desirable, then its rejected
            reply, undesirable (both with the pair's origin).
        split: As for :func:`load_conversations`.
        limit: As for :func:`load_conversations`, counted in records read (a pair is one record, two examples).
        skip_invalid: As for :func:`load_conversations`.
        report: As for :func:`load_conversations`.

    Returns:
        The :class:`UnpairedExample` objects, in order.

    Raises:
        DataFormatError: On the first problem, naming file, record and field; also for conversation data.
    """
    examples = []
    for record in iter_records(source, format, split, UNPAIRED_FORMATS + PREFERENCE_FORMATS, USE_CONVERSATIONS,
                               limit, skip_invalid, report):
        examples.extend(unpair(record) if isinstance(record, PreferencePair) else (record,))
    return examples


def _display(source) -> str:
    """The source's name in errors raised before it is opened."""
    if isinstance(source, list | tuple):
        return "<memory>"
    return os.fspath(source) if isinstance(source, str | os.PathLike) else str(source)


def _data_kind(formats: tuple[str, ...]) -> str:
    if formats == CONVERSATION_FORMATS:
        return "conversation data (alpaca, sharegpt or messages)"
    if formats == PREFERENCE_FORMATS:
        return "preference data (preference or hh)"
    return "unpaired preference data (unpaired), or pairs to split (preference or hh)"


def _load(
    source,
    format: str,
    split: str | None,
    formats: tuple[str, ...],
    hint: str,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> list:
    """Read ``source`` with the reader of one format out of ``formats``; ``hint`` says what to do instead."""
    return list(iter_records(source, format, split, formats, hint, limit, skip_invalid, report))


def iter_records(
    source,
    format: str,
    split: str | None,
    formats: tuple[str, ...],
    hint: str,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> Iterator:
    """The records of :func:`_load` one at a time, so that a conversion streams from source to output."""
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(
            _display(source), None, None, "format to be one of auto, " + ", ".join(FORMATS), describe(format)
        )
    if format != "auto" and format not in formats:
        raise DataFormatError(_display(source), None, None, _data_kind(formats), Found(f"format={format!r}"), hint=hint)
    report = report if report is not None else LoadReport()
    opened = open_source(source, split)
    report.source = opened.name
    if limit is not None and limit <= 0:
        return
    fmt = None if format == "auto" else format
    if fmt is not None:
        _check_columns(opened, fmt)
    accepted = 0
    records = opened.records
    try:
        for record, position in records:
            where = Where(opened.name, position, opened.unit, report)
            report.records += 1
            try:
                if isinstance(record, DataFormatError):  # a record the source could not parse
                    raise record
                check_value(record, where)
                if not isinstance(record, dict):
                    raise where.error(None, "a JSON object (one record)", record)
                if fmt is None:
                    detected = detect_format(record, where)
                    if detected not in formats:
                        # The wrong kind of data altogether: no use skipping record after record of it.
                        raise _WrongKind(
                            where.error(None, _data_kind(formats), Found(f"{detected} data ({describe(record)})"), hint=hint)
                        )
                    _check_columns(opened, detected)
                    fmt = detected
                else:
                    _check_same_format(record, fmt, format == "auto", where)
                canonical = READERS[fmt](record, where)
                report.accept()
            except DataFormatError as error:
                if not skip_invalid:
                    raise
                report.reject(where.origin, error)
                continue
            yield canonical
            accepted += 1
            if limit is not None and accepted >= limit:
                break
    except _WrongKind as wrong:
        raise wrong.error from None
    finally:
        close = getattr(records, "close", None)
        if close is not None:
            close()  # a limit leaves the file half read: close it now, not when the generator is collected
    if not accepted:
        raise DataFormatError(
            opened.name,
            None,
            None,
            "at least one valid record",
            Found(f"none of {report.records} (" + "; ".join(f"{n} x {why}" for why, n in report.skipped.items()) + ")"),
        )


class _WrongKind(Exception):
    """Carries a DataFormatError past ``skip_invalid``: preference data given as conversations, or the reverse."""

    def __init__(self, error: DataFormatError):
        super().__init__(str(error))
        self.error = error


def _check_same_format(record: dict, fmt: str, detected: bool, where: Where) -> None:
    """A record whose keys point to another format: say so, rather than report a missing field."""
    own = guess_format(record)
    if own is None or own == fmt or {own, fmt} <= set(PREFERENCE_FORMATS):
        # Between preference and hh the keys are the same; the format's reader names the field that is wrong.
        return
    missing = [key for key in REQUIRED_FIELDS[fmt] if key not in record]
    if fmt == "preference" and "prompt" not in record:
        missing.insert(0, "prompt")
    why = "detected from the first record; one file holds one format" if detected else f"format={fmt!r}"
    raise where.error(
        missing[0] if missing else None,
        f"{article(fmt)} record ({why})",
        Found(f"{article(own)} record ({describe(record)})"),
    )


def _check_columns(opened: Source, fmt: str) -> None:
    """A CSV must have the format's columns: report the header once instead of every row."""
    if opened.columns is None:
        return
    missing = [key for key in REQUIRED_FIELDS[fmt] if key not in opened.columns]
    if missing:
        raise DataFormatError(
            opened.name,
            None,
            missing[0],
            f"a column '{missing[0]}' ({fmt} needs " + ", ".join(REQUIRED_FIELDS[fmt]) + ")",
            Found("columns " + ", ".join(opened.columns)),
        )
