"""The canonical form every reader produces, the error every reader raises, and the rules a message list obeys.

A message is a plain ``{"role": "system" | "user" | "assistant", "content": str}`` dict: the shape TRL,
transformers' ``apply_chat_template`` and jinja chat templates consume, so the trainers need no adapter.

One optional key more: ``"weight"``, ``0`` or ``1`` (an ``int``; sources may write ``true``/``false``), axolotl's
per-turn ShareGPT convention. ``0`` on an assistant turn means "keep it as context, do not train on it"; ``1`` is
what an assistant turn without the key means. It is kept only where the source gave it, on any role, and written
back by the ``messages``, ``sharegpt`` and ``preference`` writers.

Alpaca records: the user message's ``content`` is ``instruction + "\n\n" + input`` when the record's input is not
``""`` (Stanford's rule, so a whitespace-only input counts), else the instruction alone, and that input is kept again
under the message's ``input`` key: ``{"role": "user", "content": "Translate.\n\nGood morning", "input": "Good
morning"}``. Every template but ``alpaca`` and every jinja template reads ``content`` and ignores the key; ``alpaca``
takes its with-input prompt from it (the instruction is ``content`` minus ``"\n\n" + input``), so an instruction
with a blank line in it is never split. A record's ``history`` (``[[instruction, output], ...]``, LLaMA-Factory's
convention) becomes user/assistant turns before it, trained like any other reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")

# Sentinel: ``got=None`` must still be able to say "got null".
_UNSET = object()


class DataFormatError(ValueError):
    """Malformed input data, located precisely enough to fix it without a debugger.

    The message reads ``data.jsonl, line 12, field 'conversations[2].from': expected one of human, gpt, system;
    got 'bot'``. Only the parts that are known appear: whole-file problems have no record, record-level problems
    no field.

    Attributes:
        file: The file, directory, hub id or ``<memory>`` the data came from.
        record: 1-based line number for JSON Lines, 0-based index otherwise; ``None`` for whole-file problems.
        field: Dotted path inside the record, e.g. ``conversations[2].from``; ``None`` for record-level problems.
        expected: What the data should have been, as a phrase that follows "expected".
        got: A short description of what was found, or ``None``.
        hint: What to do about it, or ``None``.
        unit: ``"line"`` when ``record`` is a line number, ``"record"`` when it is an index.
    """

    def __init__(
        self,
        file: str,
        record: int | None,
        field: str | None,
        expected: str,
        got: str | None = None,
        *,
        hint: str | None = None,
        unit: str = "record",
    ):
        self.file = str(file)
        self.record = record
        self.field = field
        self.expected = expected
        self.got = got
        self.hint = hint
        self.unit = unit
        super().__init__(self._format())

    def _format(self) -> str:
        where = self.file
        if self.record is not None:
            where += f", {self.unit} {self.record}"
        if self.field:
            where += f", field '{self.field}'"
        text = f"{where}: expected {self.expected}"
        if self.got is not None:
            text += f"; got {self.got}"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __reduce__(self):
        # The default reduce would call cls(message) and fail; keep the error picklable (dataloader workers).
        return (
            _rebuild_error,
            (self.file, self.record, self.field, self.expected, self.got, self.hint, self.unit),
        )


def _rebuild_error(file, record, field, expected, got, hint, unit) -> DataFormatError:
    return DataFormatError(file, record, field, expected, got, hint=hint, unit=unit)


@dataclass
class Conversation:
    """One training conversation.

    Attributes:
        messages: Optional leading system message, then user/assistant turns alternating, ending on assistant;
            each ``{"role", "content"}`` with an optional ``"weight"`` (see the module docstring).
        origin: Where it came from: ``path/to/file.jsonl:12`` (line) or ``path/to/file.json[3]`` (index).
        meta: Fields of the source record that are not part of the conversation (kept so they survive conversion).
    """

    messages: list[dict[str, Any]]
    origin: str = "<memory>"
    meta: dict = field(default_factory=dict)


@dataclass
class PreferencePair:
    """One preference comparison: two assistant replies to the same prompt.

    Attributes:
        prompt: Optional system message, then alternating turns, ending on a user turn.
        chosen: The preferred reply, as a list holding one assistant message.
        rejected: The dispreferred reply, as a list holding one assistant message.
        origin: Where it came from, as for :class:`Conversation`.
        meta: Fields of the source record that are not part of the pair.
    """

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    origin: str = "<memory>"
    meta: dict = field(default_factory=dict)


@dataclass
class UnpairedExample:
    """One completion judged on its own, desirable or not (KTO's data; TRL's unpaired preference format).

    Attributes:
        prompt: Optional system message, then alternating turns, ending on a user turn.
        completion: The reply, as a list holding one assistant message.
        desirable: ``True`` for a desirable completion (TRL's ``label: true``), ``False`` for an undesirable one.
        origin: Where it came from, as for :class:`Conversation`; the two examples of a split pair share it.
        meta: Fields of the source record that are not part of the example.
    """

    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    desirable: bool
    origin: str = "<memory>"
    meta: dict = field(default_factory=dict)


def unpair(pair: PreferencePair) -> tuple[UnpairedExample, UnpairedExample]:
    """A preference pair as two unpaired examples: the chosen reply desirable, the rejected one undesirable (as TRL's
    ``unpair_preference_dataset`` does)."""
    return (UnpairedExample(pair.prompt, pair.chosen, True, pair.origin, dict(pair.meta)),
            UnpairedExample(pair.prompt, pair.rejected, False, pair.origin, dict(pair.meta)))


@dataclass(frozen=True)
class Where:
    """A record's position, so that deep validation code can raise a fully located error.

    Attributes:
        file: Display name of the source.
        record: Line number or index of the record (``None`` for whole-source problems).
        unit: ``"line"`` or ``"record"``.
        report: The :class:`~data_formats.report.LoadReport` of the load, so a reader can count what it changed
            (:meth:`note`); ``None`` outside a load.
    """

    file: str
    record: int | None = None
    unit: str = "record"
    report: Any = field(default=None, compare=False, repr=False)

    @property
    def origin(self) -> str:
        """``file:line`` for line-numbered sources, ``file[index]`` otherwise."""
        if self.record is None:
            return self.file
        return f"{self.file}:{self.record}" if self.unit == "line" else f"{self.file}[{self.record}]"

    def at(self, record: int | None) -> Where:
        """The same source, another record."""
        return Where(self.file, record, self.unit, self.report)

    def note(self, change: str) -> None:
        """Count a change a reader made to this record (e.g. a dropped leading assistant turn) in the load report."""
        if self.report is not None:
            self.report.note(change)

    def error(self, field: str | None, expected: str, got=_UNSET, *, hint: str | None = None) -> DataFormatError:
        """A :class:`DataFormatError` at this position; ``got`` is a raw value, described via :func:`describe`."""
        got_text = None if got is _UNSET else describe(got)
        return DataFormatError(self.file, self.record, field, expected, got_text, hint=hint, unit=self.unit)


class Found(str):
    """Text that :func:`describe` passes through verbatim (a description, not a value to quote)."""


def describe(value, limit: int = 80) -> str:
    """A short, unambiguous description of a JSON value for an error message.

    Args:
        value: The offending value.
        limit: Longest string shown before it is cut with an ellipsis.

    Returns:
        ``'bot'`` for strings, ``a number (3)``, ``null``, ``a list of 2 items``, ``an object with keys a, b``.
    """
    if isinstance(value, Found):
        return str(value)
    if isinstance(value, str):
        shown = value if len(value) <= limit else value[:limit] + "..."
        return repr(shown)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        keys = ", ".join(str(k) for k in list(value)[:8]) + (", ..." if len(value) > 8 else "")
        return f"an object with keys {keys}" if value else "an empty object"
    return f"a {type(value).__name__}"


@dataclass(frozen=True)
class Turn:
    """Where one canonical message came from, for error messages in the source's own vocabulary.

    Attributes:
        role_field: Dotted path of the role in the record, e.g. ``conversations[2].from``.
        content_field: Dotted path of the content, e.g. ``conversations[2].value``.
        raw_role: The role as the source spelled it (``human``), shown after "got".
    """

    role_field: str
    content_field: str
    raw_role: str


# How each source spells the roles, so that "expected 'gpt'" reads right for ShareGPT and "'assistant'" for messages.
MESSAGE_ROLE_NAMES = {"system": "system", "user": "user", "assistant": "assistant"}


def validate_messages(
    messages: Sequence[dict],
    where: Where,
    *,
    ends_on: str = "assistant",
    container: str = "messages",
    turns: Sequence[Turn] | None = None,
    role_names: dict[str, str] = MESSAGE_ROLE_NAMES,
) -> None:
    """Check the structure of a canonical message list; raise the first problem as a located error.

    Rules: an optional system message first (and only first), then turns alternating user, assistant, user, ...,
    user and assistant contents non-empty, and the list ends on ``ends_on`` (``"assistant"`` for a conversation,
    ``"user"`` for a preference prompt).

    Args:
        messages: Canonical ``{"role", "content"}`` dicts whose roles and content types are already checked.
        where: The record's position.
        ends_on: Role the list must end on.
        container: Field path of the whole list, used for list-level problems.
        turns: Per message, where its role and content live in the source; defaults to ``container[i].role``.
        role_names: How the source spells each canonical role.

    Raises:
        DataFormatError: On the first rule broken.
    """
    if turns is None:
        # Messages built in code rather than by a reader: check the shapes a reader would have checked.
        if not isinstance(messages, list | tuple):
            raise where.error(container, "a list of messages", messages)
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise where.error(f"{container}[{i}]", "an object with 'role' and 'content'", message)
            if message.get("role") not in ROLES:
                raise where.error(f"{container}[{i}].role", "one of " + ", ".join(ROLES), message.get("role"))
            if not isinstance(message.get("content"), str):
                raise where.error(f"{container}[{i}].content", "a string", message.get("content"))
            weight = message.get("weight", 1)
            if type(weight) not in (int, bool) or weight not in (0, 1):
                raise where.error(f"{container}[{i}].weight", "a weight of 0 or 1", weight)
        turns = [Turn(f"{container}[{i}].role", f"{container}[{i}].content", m["role"]) for i, m in enumerate(messages)]
    if not messages:
        raise where.error(container, "a non-empty list of messages", Found("an empty list"))

    user, assistant, system = role_names["user"], role_names["assistant"], role_names["system"]
    position = 0  # index among the non-system turns: even is user, odd is assistant
    for i, (message, turn) in enumerate(zip(messages, turns, strict=True)):
        role = message["role"]
        if role == "system":
            if i != 0:
                raise where.error(
                    turn.role_field,
                    f"'{user}' or '{assistant}' (a '{system}' message may only come first)",
                    turn.raw_role,
                )
            continue
        wanted = "user" if position % 2 == 0 else "assistant"
        if role != wanted:
            raise where.error(
                turn.role_field,
                f"'{role_names[wanted]}' (turns alternate {user}, {assistant} after an optional leading {system})",
                turn.raw_role,
            )
        if not message["content"].strip():
            label = "user turn" if role == "user" else "assistant reply"
            raise where.error(turn.content_field, f"a non-empty {label}", message["content"])
        position += 1

    if ends_on == "assistant":
        if not any(m["role"] == "assistant" for m in messages):
            raise where.error(container, f"at least one '{assistant}' turn", Found("none"))
        if messages[-1]["role"] != "assistant":
            raise where.error(
                turns[-1].role_field,
                f"the conversation to end on an '{assistant}' turn (the reply that is trained on)",
                turns[-1].raw_role,
            )
    else:
        if not any(m["role"] == "user" for m in messages):
            raise where.error(container, f"at least one '{user}' turn", Found("none"))
        if messages[-1]["role"] != "user":
            raise where.error(
                turns[-1].role_field,
                f"the prompt to end on a '{user}' turn (the reply comes in its own field)",
                turns[-1].raw_role,
            )
