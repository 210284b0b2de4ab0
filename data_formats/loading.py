"""The entry points that tie a source to a reader: one format per file, every record checked against it."""

from __future__ import annotations

import os

from .canonical import Conversation, DataFormatError, Found, PreferencePair, Where, describe
from .readers import (
    CONVERSATION_FORMATS,
    FORMATS,
    PREFERENCE_FORMATS,
    READERS,
    REQUIRED_FIELDS,
    article,
    detect_format,
    guess_format,
)
from .sources import Source, open_source

USE_PREFERENCES = "use load_preferences for preference data"
USE_CONVERSATIONS = "use load_conversations for conversation data"


def load_conversations(source, format: str = "auto", split: str | None = None) -> list[Conversation]:
    """Read instruction or chat data into canonical conversations.

    Args:
        source: A ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, a ``datasets`` ``save_to_disk`` directory,
            a hub dataset id (``owner/name``), or a list of dicts.
        format: ``"auto"`` (detected from the first record), ``"alpaca"``, ``"sharegpt"`` or ``"messages"``.
        split: Split of a ``DatasetDict`` directory or hub dataset (default ``"train"``).

    Returns:
        One :class:`Conversation` per record, in order.

    Raises:
        DataFormatError: On the first problem, naming file, record and field; also for preference data.
    """
    return _load(source, format, split, CONVERSATION_FORMATS, USE_PREFERENCES)


def load_preferences(source, format: str = "auto", split: str | None = None) -> list[PreferencePair]:
    """Read preference data into canonical pairs.

    Args:
        source: As for :func:`load_conversations`.
        format: ``"auto"``, ``"preference"`` (prompt/chosen/rejected) or ``"hh"`` (Anthropic HH transcripts).
        split: As for :func:`load_conversations`.

    Returns:
        One :class:`PreferencePair` per record, in order.

    Raises:
        DataFormatError: On the first problem, naming file, record and field; also for conversation data.
    """
    return _load(source, format, split, PREFERENCE_FORMATS, USE_CONVERSATIONS)


def _display(source) -> str:
    """The source's name in errors raised before it is opened."""
    if isinstance(source, list | tuple):
        return "<memory>"
    return os.fspath(source) if isinstance(source, str | os.PathLike) else str(source)


def _data_kind(formats: tuple[str, ...]) -> str:
    if formats == CONVERSATION_FORMATS:
        return "conversation data (alpaca, sharegpt or messages)"
    return "preference data (preference or hh)"


def _load(source, format: str, split: str | None, formats: tuple[str, ...], hint: str) -> list:
    """Read ``source`` with the reader of one format out of ``formats``; ``hint`` says what to do instead."""
    if format != "auto" and format not in FORMATS:
        raise DataFormatError(
            _display(source), None, None, "format to be one of auto, " + ", ".join(FORMATS), describe(format)
        )
    if format != "auto" and format not in formats:
        raise DataFormatError(_display(source), None, None, _data_kind(formats), Found(f"format={format!r}"), hint=hint)
    opened = open_source(source, split)
    fmt = None if format == "auto" else format
    if fmt is not None:
        _check_columns(opened, fmt)
    out = []
    for record, position in opened.records:
        where = opened.where(position)
        if not isinstance(record, dict):
            raise where.error(None, "a JSON object (one record)", record)
        if fmt is None:
            fmt = detect_format(record, where)
            if fmt not in formats:
                raise where.error(None, _data_kind(formats), Found(f"{fmt} data ({describe(record)})"), hint=hint)
            _check_columns(opened, fmt)
        else:
            _check_same_format(record, fmt, format == "auto", where)
        out.append(READERS[fmt](record, where))
    return out


def _check_same_format(record: dict, fmt: str, detected: bool, where: Where) -> None:
    """A record whose keys point to another format: say so, rather than report a missing field."""
    own = guess_format(record)
    if own is None or own == fmt:
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
