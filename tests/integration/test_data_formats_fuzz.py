"""Property-based tests of the readers (hypothesis): whatever records or bytes come in, the only exception is
``DataFormatError``, and every record that is accepted comes back unchanged after ``write`` and a second read."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_formats import DataFormatError, load_conversations, load_preferences, write
from data_formats.readers import guess_format

SETTINGS = settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

# Text with the characters that have broken readers before: a lone surrogate, markers, blanks, non-ASCII.
texts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "\n", "Hi", "\ud800", "x\udfffy", "\n\nHuman: q", "\n\nAssistant: a", "漢字😀", "\x00"]),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=8,
)
# Non-blank text that UTF-8 can encode: what a well-formed turn holds.
words = st.text(st.characters(codec="utf-8"), min_size=1, max_size=8).filter(str.strip)
# Mostly well-formed values, so that many records get past the first check and exercise the deep ones.
contents = st.one_of(texts, texts, texts, json_values)
weights = st.one_of(st.sampled_from([0, 1, True, False, None]), scalars)
ROLE_KEYS = {"messages": ("role", "content"), "sharegpt": ("from", "value")}
ROLES = ["system", "user", "assistant", "human", "gpt", "chatgpt", "bot", "Human", None, 3]


@st.composite
def message_items(draw, kind: str):
    role_key, content_key = ROLE_KEYS[kind]
    item = {}
    if draw(st.integers(0, 9)):
        item[role_key] = draw(st.sampled_from(ROLES))
    if draw(st.integers(0, 9)):
        item[content_key] = draw(contents)
    if not draw(st.integers(0, 3)):
        item["weight"] = draw(weights)
    if not draw(st.integers(0, 5)):
        item[draw(texts)] = draw(json_values)
    return item


def alternating(kind: str):
    """Well-formed turns (optional system, alternating, ending on the assistant): the records most readers accept."""
    role_key, content_key = ROLE_KEYS[kind]
    names = {"messages": ("system", "user", "assistant"), "sharegpt": ("system", "human", "gpt")}[kind]

    @st.composite
    def build(draw):
        turns = []
        if draw(st.booleans()):
            turns.append({role_key: names[0], content_key: draw(st.text(st.characters(codec="utf-8"), max_size=8))})
        for i in range(2 * draw(st.integers(1, 3))):
            turn = {role_key: names[1 + i % 2], content_key: draw(words)}
            if not draw(st.integers(0, 3)):
                turn["weight"] = draw(st.sampled_from([0, 1, True, False]))
            turns.append(turn)
        return turns

    return build()


def turn_lists(kind: str):
    return st.one_of(alternating(kind), st.lists(message_items(kind), max_size=5), json_values)


extras = st.dictionaries(st.sampled_from(["id", "task", "score", "system", "input", "prompt", "meta"]), json_values,
                         max_size=2)
hh_texts = st.one_of(
    st.builds(lambda q, a: f"\n\nHuman: {q}\n\nAssistant: {a}", st.text(max_size=6), st.text(max_size=6)),
    st.builds(lambda q, a, h: f"Human: {q}\n\nAssistant: {a}\n\nHuman: {h}", texts, texts, texts),
    contents,
)


@st.composite
def hh_pairs(draw):
    """Two transcripts of one prompt, the shape real HH records have."""
    prompt = "".join(f"\n\nHuman: {draw(words)}\n\nAssistant: {draw(words)}" for _ in range(draw(st.integers(0, 2))))
    prompt += f"\n\nHuman: {draw(words)}\n\nAssistant: "
    return {"chosen": prompt + draw(words), "rejected": prompt + draw(words)}

records = st.one_of(
    st.builds(lambda c, e: {**e, "conversations": c}, turn_lists("sharegpt"), extras),
    st.builds(lambda m, e: {**e, "messages": m}, turn_lists("messages"), extras),
    st.builds(lambda i, o, e: {**e, "instruction": i, "output": o}, contents, contents, extras),
    st.builds(lambda i, o: {"instruction": i, "output": o}, words, words),
    st.builds(lambda p, c, r, e: {**e, "prompt": p, "chosen": c, "rejected": r},
              st.one_of(texts, turn_lists("messages"), st.none()), st.one_of(texts, turn_lists("messages")),
              st.one_of(texts, turn_lists("messages")), extras),
    st.builds(lambda c, r, e: {**e, "chosen": c, "rejected": r}, hh_texts, hh_texts, extras),
    st.builds(lambda pair, e: {**e, **pair}, hh_pairs(), extras),
    st.dictionaries(texts, json_values, max_size=3),
    json_values,
)


def canonical(record):
    if hasattr(record, "messages"):
        return record.messages, record.meta
    return record.prompt, record.chosen, record.rejected, record.meta


def read_back(accepted, loader, to: str):
    """Write the accepted records in ``to`` and read them again: the canonical records must be the same."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.jsonl"
        write(accepted, out, to=to)
        again = loader(out, format=to)
    assert [canonical(r) for r in again] == [canonical(r) for r in accepted]


def check_records(batch):
    for loader, outputs in ((load_conversations, None), (load_preferences, "preference")):
        try:
            accepted = loader(batch, skip_invalid=True)
        except DataFormatError:
            continue
        if outputs == "preference":
            read_back(accepted, loader, "preference")

            continue
        # A format's meta cannot hold its own fields, so a ShareGPT source is written back as ShareGPT (its meta may
        # hold a "messages" key), the others as messages.
        first = batch[int(accepted[0].origin.split("[")[1].rstrip("]"))]
        read_back(accepted, loader, "sharegpt" if guess_format(first) == "sharegpt" else "messages")



@SETTINGS
@given(st.lists(records, min_size=1, max_size=4))
def test_random_records_raise_only_data_format_errors_and_round_trip(batch):
    check_records(batch)


well_formed_preferences = st.builds(
    lambda p, c, r: {"prompt": p, "chosen": c, "rejected": r}, words, words, words
).filter(lambda r: r["chosen"].strip() != r["rejected"].strip())
WELL_FORMED = {
    "alpaca": st.builds(lambda i, o, e: {**e, "instruction": i, "output": o}, words, words, st.just({"id": 1})),
    "sharegpt": st.builds(lambda c: {"conversations": c}, alternating("sharegpt")),
    "messages": st.builds(lambda m: {"messages": m}, alternating("messages")),
    "preference": well_formed_preferences,
    "hh": hh_pairs().filter(lambda r: r["chosen"].strip() != r["rejected"].strip()),
}
WRITE_AS = {"alpaca": "messages", "sharegpt": "sharegpt", "messages": "messages", "preference": "preference",
            "hh": "preference"}


@SETTINGS
@given(st.sampled_from(sorted(WELL_FORMED)), st.data())
def test_well_formed_records_are_all_accepted_and_round_trip(fmt, data):
    """The properties above are not vacuous: records of every format that follow the rules are all accepted."""
    batch = data.draw(st.lists(WELL_FORMED[fmt], min_size=1, max_size=4))
    loader = load_preferences if fmt in ("preference", "hh") else load_conversations
    accepted = loader(batch, format=fmt)
    assert len(accepted) == len(batch)
    read_back(accepted, loader, WRITE_AS[fmt])


@SETTINGS
@given(st.lists(records, min_size=1, max_size=4))
def test_random_records_from_a_file_behave_as_from_memory(batch):
    """The same records as JSON Lines (NaN and Infinity written as json.dumps does): same outcome as in memory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in batch), encoding="utf-8", errors="surrogatepass")
        for loader in (load_conversations, load_preferences):
            try:
                from_file = [canonical(r) for r in loader(path, skip_invalid=True)]
            except DataFormatError:
                from_file = None
            try:
                from_memory = [canonical(r) for r in loader(batch, skip_invalid=True)]
            except DataFormatError:
                from_memory = None
            assert from_file == from_memory


VALID_JSONL = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
VALID_JSON = b'[{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]'
VALID_CSV = b"instruction,input,output\nx,,y\n"


@st.composite
def damaged(draw, valid: bytes):
    """A valid file with a few bytes replaced, inserted or cut: closer to real corruption than uniform noise."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "cut"]))
        byte = draw(st.sampled_from(list(b'{}[],:"\\\n\x00\xff\xc3 0aeu')))
        if action == "insert" or at == len(data):
            data.insert(at, byte)
        elif action == "replace":
            data[at] = byte
        else:
            del data[at:]
    return bytes(data)


@SETTINGS
@given(st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]), st.data())
def test_random_bytes_raise_only_data_format_errors(suffix, data):
    valid = {".jsonl": VALID_JSONL, ".json": VALID_JSON, ".csv": VALID_CSV, ".parquet": b"PAR1"}[suffix]
    content = data.draw(st.one_of(st.binary(max_size=200), damaged(valid)))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        for loader in (load_conversations, load_preferences):
            try:
                accepted = loader(path, skip_invalid=data.draw(st.booleans()))
            except DataFormatError:
                continue
            out = Path(tmp) / "out.jsonl"
            to = "preference" if loader is load_preferences else "messages"
            write(accepted, out, to=to)
            assert [canonical(r) for r in loader(out)] == [canonical(r) for r in accepted]
