"""Per-format record parsers: one source record (a dict) in, one canonical record out, or a located error.

Each reader consumes the fields that make up the conversation or pair and keeps every other field of the record in
``meta``, so that task labels, ids and reference answers survive a conversion.
"""

from __future__ import annotations

from .canonical import (
    MESSAGE_ROLE_NAMES,
    Conversation,
    Found,
    PreferencePair,
    Turn,
    UnpairedExample,
    Where,
    describe,
    validate_messages,
)

CONVERSATION_FORMATS = ("alpaca", "sharegpt", "messages")
PREFERENCE_FORMATS = ("preference", "hh")
UNPAIRED_FORMATS = ("unpaired",)
FORMATS = CONVERSATION_FORMATS + PREFERENCE_FORMATS + UNPAIRED_FORMATS

# Fields a record of each format cannot do without (checked against a CSV header before reading rows).
REQUIRED_FIELDS = {
    "alpaca": ("instruction", "output"),
    "sharegpt": ("conversations",),
    "messages": ("messages",),
    "preference": ("chosen", "rejected"),
    "hh": ("chosen", "rejected"),
    "unpaired": ("prompt", "completion", "label"),
}

MISSING = Found("nothing (the field is missing)")

# ShareGPT dumps spell the speakers several ways; the canonical three are what error messages list.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
}
SHAREGPT_ROLE_NAMES = {"system": "system", "user": "human", "assistant": "gpt"}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
HH_ROLE_NAMES = {"system": "system", "user": "Human", "assistant": "Assistant"}
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


def article(fmt: str) -> str:
    """``an alpaca`` / ``a sharegpt``: format names in running text."""
    return f"an {fmt}" if fmt in ("alpaca", "hh", "unpaired") else f"a {fmt}"


def guess_format(record) -> str | None:
    """The format a record's keys point to, or ``None`` (see :func:`detect_format`)."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "completion" in record:
        return "unpaired"
    if "chosen" in record or "rejected" in record:
        if record.get("prompt") is not None:
            return "preference"
        # Without a prompt field, plain-string sides are HH transcripts; message lists are full conversations.
        side = record.get("chosen", record.get("rejected"))
        return "hh" if isinstance(side, str) else "preference"
    if "instruction" in record:
        return "alpaca"
    return None


def detect_format(record: dict, where: Where | None = None) -> str:
    """Name the format of one record from its keys.

    ``conversations`` -> sharegpt, ``messages`` -> messages, ``completion`` -> unpaired, ``chosen``/``rejected``
    with a ``prompt`` or with message lists -> preference, ``chosen``/``rejected`` strings without a prompt -> hh,
    ``instruction`` -> alpaca.

    Args:
        record: One source record.
        where: Its position, for the error; defaults to an anonymous ``<record>``.

    Returns:
        One of ``alpaca``, ``sharegpt``, ``messages``, ``preference``, ``hh``, ``unpaired``.

    Raises:
        DataFormatError: When the record is not an object or its keys match no format.
    """
    where = where or Where("<record>")
    if not isinstance(record, dict):
        raise where.error(None, "a JSON object (one record)", record)
    fmt = guess_format(record)
    if fmt is None:
        raise where.error(
            None,
            "a record in a known format: alpaca (instruction, input, output), sharegpt (conversations), "
            "messages (messages), preference (prompt, chosen, rejected), hh (chosen, rejected transcripts) or "
            "unpaired (prompt, completion, label)",
            record,
        )
    return fmt


def _meta(record: dict, consumed: tuple[str, ...]) -> dict:
    return {k: v for k, v in record.items() if k not in consumed}


def _required_str(record: dict, key: str, where: Where, why: str) -> str:
    if key not in record or record[key] is None:
        raise where.error(key, f"a string ({why})", MISSING)
    value = record[key]
    if not isinstance(value, str):
        raise where.error(key, "a string", value)
    return value


def _optional_str(record: dict, key: str, where: Where) -> str:
    # Missing and null both mean "none": parquet and hub datasets fill absent columns with null.
    value = record.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise where.error(key, "a string", value)
    return value


def parse_message_list(
    value,
    where: Where,
    container: str,
    *,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] = MESSAGE_ROLES,
    roles_text: str = "one of system, user, assistant",
) -> tuple[list[dict[str, str]], list[Turn]]:
    """Turn a list of role/content objects into canonical messages, checking each item's shape.

    Args:
        value: The field's value, which should be a list of objects.
        where: The record's position.
        container: The field's path, e.g. ``conversations``.
        role_key: Key holding the speaker (``from`` for ShareGPT).
        content_key: Key holding the text (``value`` for ShareGPT).
        roles: Accepted speaker spellings -> canonical role.
        roles_text: How the accepted speakers are listed in errors.

    Returns:
        The canonical messages and, per message, where its role and content live in the record.

    Raises:
        DataFormatError: When the value is not a list, an item is not an object, or a role or content is wrong.
    """
    if not isinstance(value, list):
        raise where.error(container, f"a list of {{{role_key}, {content_key}}} objects", value)
    messages, turns = [], []
    for i, item in enumerate(value):
        path = f"{container}[{i}]"
        if not isinstance(item, dict):
            raise where.error(path, f"an object with '{role_key}' and '{content_key}'", item)
        if item.get(role_key) is None:
            raise where.error(f"{path}.{role_key}", roles_text, MISSING)
        raw = item[role_key]
        if not isinstance(raw, str) or raw not in roles:
            raise where.error(f"{path}.{role_key}", roles_text, raw)
        if item.get(content_key) is None:
            raise where.error(f"{path}.{content_key}", "a string", MISSING)
        content = item[content_key]
        if not isinstance(content, str):
            raise where.error(f"{path}.{content_key}", "a string", content)
        message = {"role": roles[raw], "content": content}
        if item.get("weight") is not None:
            message["weight"] = _weight(item["weight"], where, f"{path}.weight")
        if item.get("input") is not None and _turn_input(item["input"], message, where, f"{path}.input"):
            message["input"] = item["input"]  # an empty input is none, as the Alpaca reader has it
        messages.append(message)
        turns.append(Turn(f"{path}.{role_key}", f"{path}.{content_key}", raw))
    return messages, turns


def _turn_input(value, message: dict, where: Where, path: str) -> str:
    """The Alpaca input kept on a user turn (written by ``convert`` from Alpaca data): the content must end with it,
    as the Alpaca reader joins them, so the alpaca template can take the with-input prompt apart again."""
    if message["role"] != "user":
        raise where.error(path, "an input only on a user turn (the Alpaca input beside its instruction)", value)
    if not isinstance(value, str):
        raise where.error(path, "a string", value)
    if value and not message["content"].endswith("\n\n" + value):
        raise where.error(path, "the end of the turn's content after a blank line (content = instruction, blank line, "
                          "input)", value)
    return value


def _weight(value, where: Where, path: str) -> int:
    """axolotl's per-turn ``weight``: 0 or 1, or the booleans false and true."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value in (0, 1):
        return value
    raise where.error(path, "a weight of 0 or 1 (or false/true): whether the turn is trained", value)


def _record_system(record: dict, where: Where, messages: list, turns: list, container: str) -> None:
    """A record-level ``system`` beside the turns becomes the leading system message; with one already, refuse."""
    system = _optional_str(record, "system", where)
    if not system:
        return
    if messages and messages[0]["role"] == "system":
        raise where.error(
            "system",
            f"a record-level system prompt or a leading system message in {container}, not both",
            Found("both"),
        )
    messages.insert(0, {"role": "system", "content": system})
    turns.insert(0, Turn("system", "system", "system"))


def read_alpaca(record: dict, where: Where) -> Conversation:
    """Alpaca: ``instruction``, optional ``input``, ``output``, optional ``system`` and ``history``.

    The user turn's content is the instruction, followed by a blank line and the input when the input is not ``""``
    (Stanford's rule: a whitespace-only input still counts); the input is also kept under the user message's
    ``input`` key, so the alpaca template can pick its prompt from the record (see :mod:`data_formats.canonical`).
    ``history`` (LLaMA-Factory's ``[[instruction, output], ...]``) becomes earlier user/assistant turns.
    """
    instruction = _required_str(record, "instruction", where, "alpaca records need instruction and output")
    extra = _optional_str(record, "input", where)
    output = _required_str(record, "output", where, "alpaca records need instruction and output")
    system = _optional_str(record, "system", where)

    messages, turns = [], []
    if system:
        messages.append({"role": "system", "content": system})
        turns.append(Turn("system", "system", "system"))
    for i, (earlier, reply) in enumerate(_alpaca_history(record, where)):
        messages += [{"role": "user", "content": earlier}, {"role": "assistant", "content": reply}]
        turns += [
            Turn(f"history[{i}][0]", f"history[{i}][0]", "user"),
            Turn(f"history[{i}][1]", f"history[{i}][1]", "assistant"),
        ]
    user = {"role": "user", "content": instruction}
    if extra != "":
        user = {"role": "user", "content": f"{instruction}\n\n{extra}", "input": extra}
    messages.append(user)
    turns.append(Turn("instruction", "instruction", "user"))
    messages.append({"role": "assistant", "content": output})
    turns.append(Turn("output", "output", "assistant"))
    validate_messages(messages, where, container="instruction", turns=turns)
    return Conversation(messages, where.origin, _meta(record, ("instruction", "input", "output", "system", "history")))


def _alpaca_history(record: dict, where: Where) -> list[tuple[str, str]]:
    """An Alpaca record's ``history``: ``[[instruction, output], ...]``; missing or null means none."""
    history = record.get("history")
    if history is None:
        return []
    if not isinstance(history, list):
        raise where.error("history", "a list of [instruction, output] pairs (earlier turns)", history)
    pairs = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise where.error(f"history[{i}]", "a pair [instruction, output]", pair)
        for j, value in enumerate(pair):
            if not isinstance(value, str):
                raise where.error(f"history[{i}][{j}]", "a string", value)
        pairs.append((pair[0], pair[1]))
    return pairs


def read_sharegpt(record: dict, where: Where) -> Conversation:
    """ShareGPT: ``conversations`` of ``{from: human|gpt|system, value}``; optional record-level ``system``.

    ``user``/``assistant`` (and the ``chatgpt``/``bing``/``bard`` of raw ShareGPT dumps) are accepted as speakers.
    A first turn (after an optional system turn) from the assistant is dropped, as FastChat does, and counted in
    the load report. A turn's ``weight`` (0/1) and a user turn's Alpaca ``input`` are kept.
    """
    if record.get("conversations") is None:
        raise where.error("conversations", "a list of {from, value} objects", MISSING)
    messages, turns = parse_message_list(
        record["conversations"],
        where,
        "conversations",
        role_key="from",
        content_key="value",
        roles=SHAREGPT_ROLES,
        roles_text="one of human, gpt, system",
    )
    # FastChat's training drops a first turn that is not the human's (6,358 of 17,671 real ShareGPT records open
    # on "gpt", a reply to a question that was not kept); count it rather than refuse the record.
    first = 1 if messages and messages[0]["role"] == "system" else 0
    if len(messages) > first and messages[first]["role"] == "assistant":
        del messages[first], turns[first]
        where.note("dropped a leading assistant turn")
    # Some ShareGPT variants (LLaMA-Factory's) put the system prompt beside the turns instead of among them.
    _record_system(record, where, messages, turns, "conversations")
    validate_messages(messages, where, container="conversations", turns=turns, role_names=SHAREGPT_ROLE_NAMES)
    return Conversation(messages, where.origin, _meta(record, ("conversations", "system")))


def read_messages(record: dict, where: Where) -> Conversation:
    """Chat messages: ``messages`` of ``{role: system|user|assistant, content}``; optional record-level ``system``.

    A record-level ``system`` string becomes the leading system message (refused when ``messages`` has one). A
    message's ``weight`` (0/1) and a user message's Alpaca ``input`` (the end of its content) are kept.
    """
    if record.get("messages") is None:
        raise where.error("messages", "a list of {role, content} objects", MISSING)
    messages, turns = parse_message_list(record["messages"], where, "messages")
    _record_system(record, where, messages, turns, "messages")
    validate_messages(messages, where, container="messages", turns=turns, role_names=MESSAGE_ROLE_NAMES)
    return Conversation(messages, where.origin, _meta(record, ("messages", "system")))


def _side(record: dict, name: str, where: Where):
    """``chosen`` or ``rejected`` as canonical messages: a string is one assistant reply."""
    if record.get(name) is None:
        raise where.error(name, "a string or a list of messages (preference records need chosen and rejected)", MISSING)
    value = record[name]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}], [Turn(name, name, "assistant")]
    if isinstance(value, list):
        return parse_message_list(value, where, name)
    raise where.error(name, "a string or a list of messages", value)


def _reply(messages, turns, name: str, where: Where) -> list[dict[str, str]]:
    """Check that what is left of a side after the prompt is exactly one non-empty assistant message."""
    if not messages:
        raise where.error(name, "an assistant reply after the prompt", Found("nothing after the prompt"))
    for message, turn in zip(messages, turns, strict=True):
        if message["role"] != "assistant":
            raise where.error(
                turn.role_field,
                f"'assistant' ({name} holds the assistant reply, or the whole conversation starting with the prompt)",
                turn.raw_role,
            )
    if len(messages) > 1:
        raise where.error(turns[1].role_field, "a single assistant reply", Found(f"{len(messages)} assistant messages"))
    if not messages[0]["content"].strip():
        raise where.error(turns[0].content_field, "a non-empty assistant reply", messages[0]["content"])
    return messages


def same_reply(first: str, second: str) -> bool:
    """Whether two reply texts are the same reply: equal but for surrounding whitespace. A preference pair of such
    replies states no preference and is refused; rejection sampling never writes one."""
    return first.strip() == second.strip()


def _different(chosen, rejected, where: Where) -> None:
    if same_reply(chosen[0]["content"], rejected[0]["content"]):
        raise where.error("rejected", "a reply different from chosen", Found("the same text as chosen"))


def _prompt(record: dict, where: Where) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A record's ``prompt`` (a string or a message list ending on a user turn) with any record-level ``system``
    message in front, and the prompt as written (what a side that repeats the prompt repeats)."""
    value = record["prompt"]
    if isinstance(value, str):
        prompt, prompt_turns = [{"role": "user", "content": value}], [Turn("prompt", "prompt", "user")]
    elif isinstance(value, list):
        prompt, prompt_turns = parse_message_list(value, where, "prompt")
    else:
        raise where.error("prompt", "a string or a list of messages", value)
    # Sides that repeat the prompt repeat it as written, without a record-level system message.
    prompt_body = list(prompt)
    _record_system(record, where, prompt, prompt_turns, "prompt")
    validate_messages(prompt, where, ends_on="user", container="prompt", turns=prompt_turns)
    return prompt, prompt_body


def read_preference(record: dict, where: Where) -> PreferencePair:
    """Preference: ``prompt`` + ``chosen`` + ``rejected``, each a string or a list of messages.

    Accepted shapes: TRL's conversational form (prompt a message list ending on a user turn, chosen/rejected one
    assistant message each); plain strings; chosen/rejected as full conversations that repeat the prompt; and, with
    no ``prompt`` field, chosen/rejected full conversations whose common prefix is the prompt (TRL's implicit prompt).
    """
    chosen, chosen_turns = _side(record, "chosen", where)
    rejected, rejected_turns = _side(record, "rejected", where)
    consumed = ("prompt", "chosen", "rejected", "system")

    if record.get("prompt") is not None:
        prompt, prompt_body = _prompt(record, where)
        n = len(prompt_body)
        # A side that repeats the prompt before its reply is the "full conversation" shape: cut the prompt off.
        if len(chosen) > n and chosen[:n] == prompt_body:
            chosen, chosen_turns = chosen[n:], chosen_turns[n:]
        if len(rejected) > n and rejected[:n] == prompt_body:
            rejected, rejected_turns = rejected[n:], rejected_turns[n:]
        chosen = _reply(chosen, chosen_turns, "chosen", where)
        rejected = _reply(rejected, rejected_turns, "rejected", where)
        _different(chosen, rejected, where)
        return PreferencePair(prompt, chosen, rejected, where.origin, _meta(record, consumed))

    if not isinstance(record["chosen"], list) or not isinstance(record["rejected"], list):
        raise where.error(
            "prompt",
            "a string or a list of messages (only full chosen/rejected conversations can leave the prompt out)",
            MISSING,
        )
    if chosen == rejected:
        raise where.error("rejected", "a conversation different from chosen", Found("the same messages as chosen"))
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise where.error(
            "prompt",
            "a 'prompt' field, or chosen and rejected conversations that start with the same prompt",
            Found("no prompt field, and chosen and rejected differ from their first message"),
        )
    if n < len(chosen) and n < len(rejected) and chosen[n - 1]["role"] != "user":
        # They part after a shared assistant turn: the prompts themselves differ, which is not a comparison.
        raise where.error(
            f"rejected[{n}]",
            f"the same message as chosen[{n}] (without a 'prompt' field, chosen and rejected must be the same "
            "conversation up to the last user turn)",
            rejected[n]["content"],
        )
    prompt, prompt_turns = chosen[:n], chosen_turns[:n]
    _record_system(record, where, prompt, prompt_turns, "chosen")
    validate_messages(prompt, where, ends_on="user", container="chosen", turns=prompt_turns)
    chosen = _reply(chosen[n:], chosen_turns[n:], "chosen", where)
    rejected = _reply(rejected[n:], rejected_turns[n:], "rejected", where)
    _different(chosen, rejected, where)
    return PreferencePair(prompt, chosen, rejected, where.origin, _meta(record, consumed))


def _split_hh(record: dict, name: str, where: Where) -> tuple[str, str]:
    """An HH transcript -> (everything before the last Assistant turn, that turn's reply)."""
    if record.get(name) is None:
        raise where.error(name, "an HH transcript string (hh records need chosen and rejected)", MISSING)
    text = record[name]
    if not isinstance(text, str):
        raise where.error(name, "an HH transcript string ('\\n\\nHuman: ...\\n\\nAssistant: ...')", text)
    if text.startswith("Human:"):  # some copies drop the leading blank line
        text = "\n\n" + text
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise where.error(name, "a transcript with a '\\n\\nAssistant:' turn (the reply)", text)
    reply = text[cut + len(HH_ASSISTANT) :]
    human = reply.find(HH_HUMAN)
    if human >= 0:
        # A Human turn after the last reply would otherwise be trained as part of the reply.
        raise where.error(
            name,
            "a transcript ending on an '\\n\\nAssistant:' reply",
            Found(f"a last turn from Human: {describe(reply[human + len(HH_HUMAN):].strip())}"),
        )
    return text[:cut], reply.strip()


def _hh_prompt(text: str, where: Where) -> tuple[list[dict[str, str]], list[Turn]]:
    """The turns of an HH prompt (the part before the final Assistant turn)."""
    if not text.startswith(HH_HUMAN):
        raise where.error("chosen", "a transcript starting with '\\n\\nHuman:'", text)
    messages, turns = [], []
    rest = text
    while rest:
        speaker = "user" if rest.startswith(HH_HUMAN) else "assistant"
        rest = rest[len(HH_HUMAN if speaker == "user" else HH_ASSISTANT) :]
        # The turn runs to the next speaker marker, whichever comes first.
        ends = [i for i in (rest.find(HH_HUMAN), rest.find(HH_ASSISTANT)) if i >= 0]
        end = min(ends) if ends else len(rest)
        messages.append({"role": speaker, "content": rest[:end].strip()})
        turns.append(Turn("chosen", "chosen", HH_ROLE_NAMES[speaker]))
        rest = rest[end:]
    validate_messages(messages, where, ends_on="user", container="chosen", turns=turns, role_names=HH_ROLE_NAMES)
    return messages, turns


def read_hh(record: dict, where: Where) -> PreferencePair:
    """Anthropic HH: ``chosen``/``rejected`` transcripts ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``.

    The last Assistant turn of each is its reply; everything before it is the prompt and must be the same in both.
    A transcript that ends on a Human turn is refused (that turn is not a reply). A record-level ``system`` string
    becomes the prompt's leading system message; a ``prompt`` field (the prompt is inside the transcripts) is
    refused unless it is null.
    """
    if record.get("prompt") is not None:
        raise where.error(
            "prompt", "no prompt field in an hh record (the prompt is the transcripts' common start)", record["prompt"]
        )
    chosen_prompt, chosen_reply = _split_hh(record, "chosen", where)
    rejected_prompt, rejected_reply = _split_hh(record, "rejected", where)
    if chosen_prompt != rejected_prompt:
        at = next(
            (i for i, (a, b) in enumerate(zip(chosen_prompt, rejected_prompt, strict=False)) if a != b),
            min(len(chosen_prompt), len(rejected_prompt)),
        )
        raise where.error(
            "rejected",
            "the same prompt as chosen (everything before the last '\\n\\nAssistant:' must match)",
            Found(f"a prompt that differs from character {at}: {describe(rejected_prompt[at : at + 40])}"),
        )
    prompt, prompt_turns = _hh_prompt(chosen_prompt, where)
    _record_system(record, where, prompt, prompt_turns, "chosen")
    if not chosen_reply:
        raise where.error("chosen", "a non-empty reply after the last '\\n\\nAssistant:'", record["chosen"][-80:])
    if not rejected_reply:
        raise where.error("rejected", "a non-empty reply after the last '\\n\\nAssistant:'", record["rejected"][-80:])
    chosen = [{"role": "assistant", "content": chosen_reply}]
    rejected = [{"role": "assistant", "content": rejected_reply}]
    _different(chosen, rejected, where)
    return PreferencePair(prompt, chosen, rejected, where.origin, _meta(record, ("prompt", "chosen", "rejected", "system")))


def read_unpaired(record: dict, where: Where) -> UnpairedExample:
    """Unpaired preference (KTO's data, TRL's unpaired format): ``prompt`` + ``completion`` + ``label``.

    ``prompt`` is a string or a message list ending on a user turn; ``completion`` a string or one assistant message
    (or the whole conversation, repeating the prompt); ``label`` ``true`` for a desirable completion, ``false`` for an
    undesirable one. Anything else in ``label`` (a string, 0/1, null) is refused rather than guessed at.
    """
    if record.get("prompt") is None:
        raise where.error("prompt", "a string or a list of messages (unpaired records need prompt, completion, label)",
                          MISSING)
    prompt, prompt_body = _prompt(record, where)
    if record.get("completion") is None:
        raise where.error("completion", "a string or a list of messages (the reply being judged)", MISSING)
    value = record["completion"]
    if isinstance(value, str):
        completion, turns = [{"role": "assistant", "content": value}], [Turn("completion", "completion", "assistant")]
    elif isinstance(value, list):
        completion, turns = parse_message_list(value, where, "completion")
        n = len(prompt_body)
        if len(completion) > n and completion[:n] == prompt_body:  # the whole conversation: cut the prompt off
            completion, turns = completion[n:], turns[n:]
    else:
        raise where.error("completion", "a string or a list of messages", value)
    completion = _reply(completion, turns, "completion", where)
    if "label" not in record:
        raise where.error("label", "true (a desirable completion) or false (an undesirable one)", MISSING)
    label = record["label"]
    if not isinstance(label, bool):
        raise where.error("label", "true (a desirable completion) or false (an undesirable one)", label)
    return UnpairedExample(prompt, completion, label, where.origin,
                           _meta(record, ("prompt", "completion", "label", "system")))


READERS = {
    "alpaca": read_alpaca,
    "sharegpt": read_sharegpt,
    "messages": read_messages,
    "preference": read_preference,
    "hh": read_hh,
    "unpaired": read_unpaired,
}
