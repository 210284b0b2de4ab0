"""Canonical records out to JSON Lines in a named format, written atomically.

``meta`` is written back as extra keys, so that fields a reader did not consume (task labels, reference answers)
survive a conversion.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from .canonical import Conversation, DataFormatError, Found, PreferencePair, UnpairedExample, Where, validate_messages

SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt"}


def _conversation(record, where: Where, to: str) -> Conversation:
    if not isinstance(record, Conversation):
        hint = "write preference pairs with to='preference'" if isinstance(record, PreferencePair) else None
        raise where.error(None, f"a Conversation for to={to!r}", Found(f"a {type(record).__name__}"), hint=hint)
    validate_messages(record.messages, where)
    if to == "alpaca":
        weighted = next((i for i, m in enumerate(record.messages) if "weight" in m), None)
        if weighted is not None:
            # Alpaca has no place for a per-turn weight; writing the record without it would train that turn.
            raise where.error(
                f"messages[{weighted}].weight",
                "messages without a weight for alpaca",
                record.messages[weighted]["weight"],
                hint="write weighted turns as messages or sharegpt",
            )
    return record


def _with_weight(row: dict, message: dict) -> dict:
    """The turn's optional keys: its weight, and the Alpaca input of a user turn (so the alpaca template still takes
    the with-input prompt from converted data)."""
    if "weight" in message:
        row["weight"] = message["weight"]
    if message.get("input"):
        row["input"] = message["input"]
    return row


def _messages_row(record, where: Where) -> dict:
    conv = _conversation(record, where, "messages")
    return {"messages": [_with_weight({"role": m["role"], "content": m["content"]}, m) for m in conv.messages]}


def _sharegpt_row(record, where: Where) -> dict:
    conv = _conversation(record, where, "sharegpt")
    return {
        "conversations": [
            _with_weight({"from": SHAREGPT_FROM[m["role"]], "value": m["content"]}, m) for m in conv.messages
        ]
    }


def _alpaca_row(record, where: Where) -> dict:
    conv = _conversation(record, where, "alpaca")
    roles = [m["role"] for m in conv.messages]
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise where.error(
            "messages",
            "a single-turn conversation (optional system, one user turn, one assistant reply) for alpaca",
            Found(f"{len(roles)} messages: {', '.join(roles)}"),
            hint=f"the record came from {conv.origin}; write multi-turn data as messages or sharegpt",
        )
    user = conv.messages[-2]
    # The Alpaca reader keeps a record's input beside the joined turn; a turn without one is all instruction.
    input_ = user.get("input") or ""
    if input_ and not user["content"].endswith("\n\n" + input_):
        raise where.error("messages", "a user turn whose content ends with its input", user["content"])
    instruction = user["content"][: len(user["content"]) - len(input_) - 2] if input_ else user["content"]
    row = {"instruction": instruction, "input": input_, "output": conv.messages[-1]["content"]}
    if roles[0] == "system":
        row["system"] = conv.messages[0]["content"]
    return row


def _preference_row(record, where: Where) -> dict:
    if not isinstance(record, PreferencePair):
        hint = (
            "write conversations with to='messages', 'sharegpt' or 'alpaca'"
            if isinstance(record, Conversation)
            else None
        )
        raise where.error(None, "a PreferencePair for to='preference'", Found(f"a {type(record).__name__}"), hint=hint)
    validate_messages(record.prompt, where, ends_on="user", container="prompt")
    for name in ("chosen", "rejected"):
        side = getattr(record, name)
        if not isinstance(side, list | tuple) or len(side) != 1 or not isinstance(side[0], dict):
            raise where.error(name, "a list holding one assistant message", side)
        if side[0].get("role") != "assistant":
            raise where.error(f"{name}[0].role", "'assistant'", side[0].get("role"))
        content = side[0].get("content")
        if not isinstance(content, str) or not content.strip():
            raise where.error(f"{name}[0].content", "a non-empty assistant reply", content)
    return {"prompt": record.prompt, "chosen": record.chosen, "rejected": record.rejected}


def _unpaired_row(record, where: Where) -> dict:
    if not isinstance(record, UnpairedExample):
        hint = "split pairs with data_formats.unpair first" if isinstance(record, PreferencePair) else None
        raise where.error(None, "an UnpairedExample for to='unpaired'", Found(f"a {type(record).__name__}"), hint=hint)
    validate_messages(record.prompt, where, ends_on="user", container="prompt")
    side = record.completion
    if not isinstance(side, list | tuple) or len(side) != 1 or not isinstance(side[0], dict):
        raise where.error("completion", "a list holding one assistant message", side)
    if side[0].get("role") != "assistant":
        raise where.error("completion[0].role", "'assistant'", side[0].get("role"))
    if not isinstance(side[0].get("content"), str) or not side[0]["content"].strip():
        raise where.error("completion[0].content", "a non-empty assistant reply", side[0].get("content"))
    if not isinstance(record.desirable, bool):
        raise where.error("label", "true or false", record.desirable)
    return {"prompt": record.prompt, "completion": record.completion, "label": record.desirable}


WRITERS = {
    "messages": _messages_row,
    "sharegpt": _sharegpt_row,
    "alpaca": _alpaca_row,
    "preference": _preference_row,
    "unpaired": _unpaired_row,
}


def _row(record, where: Where, to: str) -> str:
    row = WRITERS[to](record, where)
    for key, value in record.meta.items():
        if key in row:
            # Overwriting either value would lose data silently.
            raise where.error(f"meta.{key}", f"meta keys other than the {to} fields " + ", ".join(row), key)
        row[key] = value
    try:
        # allow_nan=False: NaN and Infinity are not standard JSON, and other tools' readers refuse them.
        text = json.dumps(row, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise where.error("meta", "JSON-serialisable values (finite numbers, no objects)", Found(str(e))) from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise where.error(None, "valid Unicode text", Found(f"a lone surrogate ({e.reason})")) from None
    return text


def _discard(tmp: Path) -> None:
    # Best effort: the error being raised matters more than a leftover temporary file.
    with contextlib.suppress(OSError):
        tmp.unlink()


def write(records: Iterable[Conversation | PreferencePair | UnpairedExample], path, to: str = "messages") -> int:
    """Write canonical records as JSON Lines in the format ``to``.

    The file appears complete or not at all: rows go to a temporary file beside ``path`` that replaces it at the
    end, so an error in record 900 leaves no half-written file behind.

    Args:
        records: :class:`Conversation` objects (for ``messages``, ``sharegpt``, ``alpaca``) or
            :class:`PreferencePair` objects (for ``preference``: TRL's conversational prompt/chosen/rejected) or
            :class:`UnpairedExample` objects (for ``unpaired``: TRL's conversational prompt/completion/label).
        path: Output file; parent directories are created.
        to: ``"messages"``, ``"sharegpt"``, ``"alpaca"`` (single-turn conversations only), ``"preference"`` or
            ``"unpaired"``.

    Returns:
        The number of records written.

    Raises:
        DataFormatError: For an unknown ``to``, a record that does not fit it (naming its 0-based index), or an
            output path that cannot be written.
    """
    name = os.fspath(path)
    if to not in WRITERS:
        raise DataFormatError(name, None, None, "to to be one of " + ", ".join(WRITERS), repr(to))
    path = Path(name)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    count = 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Mode "x" (not mkstemp) so the file gets the usual umask permissions rather than 0600.
        with open(tmp, "x", encoding="utf-8") as f:
            for count, record in enumerate(records, 1):
                f.write(_row(record, Where(name, count - 1), to) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise DataFormatError(name, None, None, "a writable path", Found(e.strerror or str(e))) from None
    except BaseException:
        _discard(tmp)
        raise
    return count
