"""data_formats: every malformed input is ONE DataFormatError naming file, record, field and what was expected."""

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from data_formats import (
    Conversation,
    DataFormatError,
    PreferencePair,
    load_conversations,
    load_preferences,
    sources,
    write,
)
from data_formats.cli import main

ROOT = Path(__file__).resolve().parents[2]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


ALPACA = {"instruction": "Add 2 and 3.", "input": "", "output": "5"}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
PREF = {"prompt": "2+2?", "chosen": "4", "rejected": "5"}


def messages(*msgs):
    return {"messages": list(msgs)}


def check(call, file, record, field, *fragments):
    """``call()`` raises one DataFormatError with this location whose message holds every fragment."""
    with pytest.raises(DataFormatError) as info:
        call()
    e = info.value
    assert (e.file, e.record, e.field) == (str(file), record, field), str(e)
    text = str(e)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert text.startswith(str(file))
    return e


# One malformed record on line 2 of a JSON Lines file, after a good record of the same format on line 1.
# (id, loader, good first record, bad record, field, fragments of the message)
RECORD_CASES = [
    ("record-is-a-list", "conv", ALPACA, [1, 2], None, ["a JSON object", "got a list of 2 items"]),
    ("record-is-a-number", "conv", ALPACA, 42, None, ["a JSON object", "got a number (42)"]),
    ("alpaca-missing-output", "conv", ALPACA, {"instruction": "x", "input": ""}, "output", ["a string", "missing"]),
    ("alpaca-missing-instruction", "conv", ALPACA, {"input": "", "output": "y"}, "instruction", ["missing"]),
    ("alpaca-output-not-string", "conv", ALPACA, {"instruction": "x", "output": 5}, "output", ["a number (5)"]),
    ("alpaca-empty-output", "conv", ALPACA, {"instruction": "x", "output": " "}, "output", ["non-empty assistant"]),
    ("alpaca-empty-instruction", "conv", ALPACA, {"instruction": "", "output": "y"}, "instruction", ["non-empty user"]),
    (
        "sharegpt-missing-conversations",
        "conv",
        SHAREGPT,
        {"convos": SHAREGPT["conversations"]},
        "conversations",
        ["a list of {from, value} objects", "missing"],
    ),
    (
        "sharegpt-conversations-is-string",
        "conv",
        SHAREGPT,
        {"conversations": "hello"},
        "conversations",
        ["got 'hello'"],
    ),
    (
        "sharegpt-unknown-from",
        "conv",
        SHAREGPT,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
        "conversations[1].from",
        ["expected one of human, gpt, system; got 'bot'"],
    ),
    (
        "sharegpt-missing-value",
        "conv",
        SHAREGPT,
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
        "conversations[0].value",
        ["a string", "missing"],
    ),
    (
        "sharegpt-not-alternating",
        "conv",
        SHAREGPT,
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
        "conversations[1].from",
        ["expected 'gpt'", "got 'human'"],
    ),
    (
        "sharegpt-system-twice",
        "conv",
        SHAREGPT,
        {"system": "S", **{"conversations": [{"from": "system", "value": "T"}, *SHAREGPT["conversations"]]}},
        "system",
        ["not both"],
    ),
    (
        "messages-content-is-number",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), {"role": "assistant", "content": 3}),
        "messages[1].content",
        ["expected a string; got a number (3)"],
    ),
    (
        "messages-item-not-object",
        "conv",
        messages(user("a"), assistant("b")),
        messages("hello", assistant("b")),
        "messages[0]",
        ["an object with 'role' and 'content'", "got 'hello'"],
    ),
    (
        "messages-unknown-role",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), {"role": "bot", "content": "b"}),
        "messages[1].role",
        ["one of system, user, assistant; got 'bot'"],
    ),
    (
        "messages-empty-assistant",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), assistant("")),
        "messages[1].content",
        ["a non-empty assistant reply; got ''"],
    ),
    (
        "messages-whitespace-assistant",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), assistant(" \n\t")),
        "messages[1].content",
        ["a non-empty assistant reply"],
    ),
    (
        "messages-empty-user",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("   "), assistant("b")),
        "messages[0].content",
        ["a non-empty user turn"],
    ),
    (
        "messages-two-user-turns",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), user("b"), assistant("c")),
        "messages[1].role",
        ["expected 'assistant' (turns alternate", "got 'user'"],
    ),
    (
        "messages-starts-with-assistant",
        "conv",
        messages(user("a"), assistant("b")),
        messages(assistant("a"), user("b"), assistant("c")),
        "messages[0].role",
        ["expected 'user'", "got 'assistant'"],
    ),
    (
        "messages-system-not-first",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), system("s"), assistant("b")),
        "messages[1].role",
        ["may only come first", "got 'system'"],
    ),
    (
        "messages-ends-on-user",
        "conv",
        messages(user("a"), assistant("b")),
        messages(user("a"), assistant("b"), user("c")),
        "messages[2].role",
        ["end on an 'assistant' turn", "got 'user'"],
    ),
    (
        "messages-no-assistant",
        "conv",
        messages(user("a"), assistant("b")),
        messages(system("s"), user("a")),
        "messages",
        ["at least one 'assistant' turn; got none"],
    ),
    (
        "messages-empty-list",
        "conv",
        messages(user("a"), assistant("b")),
        messages(),
        "messages",
        ["a non-empty list of messages"],
    ),
    (
        "mixed-formats",
        "conv",
        ALPACA,
        SHAREGPT,
        "instruction",
        ["an alpaca record", "first record", "got a sharegpt record", "conversations"],
    ),
    ("unrelated-keys-later", "conv", ALPACA, {"text": "x"}, "instruction", ["missing"]),
    (
        "chosen-identical-to-rejected",
        "pref",
        PREF,
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        "rejected",
        ["a reply different from chosen"],
    ),
    (
        "chosen-identical-lists",
        "pref",
        PREF,
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("a")]},
        "rejected",
        ["different from chosen"],
    ),
    (
        "prompt-not-ending-on-user",
        "pref",
        PREF,
        {"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")], "rejected": [assistant("c")]},
        "prompt[1].role",
        ["the prompt to end on a 'user' turn", "got 'assistant'"],
    ),
    (
        "chosen-list-with-user-message",
        "pref",
        PREF,
        {"prompt": "q", "chosen": [user("other"), assistant("b")], "rejected": [assistant("c")]},
        "chosen[0].role",
        ["expected 'assistant'", "got 'user'"],
    ),
    (
        "chosen-two-assistant-messages",
        "pref",
        PREF,
        {"prompt": "q", "chosen": [assistant("b"), assistant("c")], "rejected": [assistant("d")]},
        "chosen[1].role",
        ["a single assistant reply; got 2 assistant messages"],
    ),
    (
        "chosen-empty-reply",
        "pref",
        PREF,
        {"prompt": "q", "chosen": "", "rejected": "r"},
        "chosen",
        ["a non-empty assistant reply"],
    ),
    ("preference-missing-rejected", "pref", PREF, {"prompt": "q", "chosen": "a"}, "rejected", ["missing"]),
    (
        "preference-prompt-wrong-type",
        "pref",
        PREF,
        {"prompt": 7, "chosen": "a", "rejected": "b"},
        "prompt",
        ["a string or a list of messages", "a number (7)"],
    ),
    (
        "implicit-prompt-no-common-prefix",
        "pref",
        PREF,
        {"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("c")]},
        "prompt",
        ["start with the same prompt"],
    ),
    (
        "implicit-prompt-diverging-before-last-user",
        "pref",
        PREF,
        {
            "chosen": [user("a"), assistant("b"), user("c"), assistant("d")],
            "rejected": [user("a"), assistant("b"), user("X"), assistant("e")],
        },
        "rejected[2]",
        ["the same message as chosen[2]", "got 'X'"],
    ),
    (
        "hh-no-assistant-turn",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi there"},
        "chosen",
        ["'\\n\\nAssistant:' turn", "'\\n\\nHuman: hi there'"],
    ),
    (
        "hh-different-prompts",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: hello\n\nAssistant: b", "rejected": "\n\nHuman: goodbye\n\nAssistant: c"},
        "rejected",
        ["the same prompt as chosen", "differs from character 9"],
    ),
    (
        "hh-empty-reply",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nAssistant:  ", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        "chosen",
        ["a non-empty reply"],
    ),
    (
        "hh-two-human-turns",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nHuman: b\n\nAssistant: d"},
        "chosen",
        ["expected 'Assistant'", "got 'Human'"],
    ),
    (
        "hh-not-starting-with-human",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        {"chosen": "Hello\n\nAssistant: b", "rejected": "Hello\n\nAssistant: c"},
        "chosen",
        ["starting with '\\n\\nHuman:'"],
    ),
    (
        "preference-record-in-hh-file",
        "pref",
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
        PREF,
        "prompt",
        ["no prompt field in an hh record", "got '2+2?'"],
    ),
]


@pytest.mark.parametrize(
    "loader, first, bad, field, fragments", [c[1:] for c in RECORD_CASES], ids=[c[0] for c in RECORD_CASES]
)
def test_bad_record_on_line_2(tmp_path, loader, first, bad, field, fragments):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    load = load_conversations if loader == "conv" else load_preferences
    check(lambda: load(path), path, 2, field, *fragments)


def test_invalid_json_on_a_jsonl_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n\n" + '{"instruction": "x", "output": }\n')
    check(lambda: load_conversations(path), path, 3, None, "one valid JSON object per line", "invalid JSON", "column")


def test_invalid_utf8_on_a_jsonl_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(ALPACA).encode() + b'\n{"instruction": "\xff"}\n')
    check(lambda: load_conversations(path), path, 2, None, "UTF-8 text", "undecodable byte")


def test_invalid_json_in_a_json_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    check(lambda: load_conversations(path), path, None, None, "valid JSON", "invalid JSON", "line 2 column")


def test_json_lines_named_json(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n")
    check(lambda: load_conversations(path), path, None, None, "Extra data", "name the file .jsonl")


def test_bad_record_in_a_json_file_uses_0_based_index(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "x", "output": ["y"]}]))
    check(lambda: load_conversations(path), path, 1, "output", "expected a string; got a list of 1 item")


def test_json_top_level_not_a_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps({"a": 1, "b": 2}))
    check(lambda: load_conversations(path), path, None, None, "a JSON list of records", "keys a, b")


def test_json_empty_list(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[]")
    check(lambda: load_conversations(path), path, None, None, "at least one record", "an empty list")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_empty_file(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    path.write_text("")
    check(lambda: load_conversations(path), path, None, None, "an empty file")


def test_file_with_only_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n   \n\t\n")
    check(lambda: load_conversations(path), path, None, None, "at least one JSON record", "only blank lines")


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "data.jsonl"
    check(lambda: load_conversations(path), path, None, None, "an existing file or directory", "no such path")


def test_missing_file_with_slash_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check(lambda: load_conversations("data/train.jsonl"), "data/train.jsonl", None, None, "no such path")


def test_directory_that_is_not_a_datasets_dir(tmp_path):
    (tmp_path / "dir").mkdir()
    check(lambda: load_conversations(tmp_path / "dir"), tmp_path / "dir", None, None, "save_to_disk", "a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_permission_denied(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")
    path.chmod(0)
    try:
        check(lambda: load_conversations(path), path, None, None, "a readable file", "permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_file(tmp_path, monkeypatch):
    # The same path as chmod 000, reachable when the tests run as root.
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")

    def denied(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(file))

    monkeypatch.setattr(sources, "open", denied, raising=False)
    check(lambda: load_conversations(path), path, None, None, "a readable file", "permission denied")


def test_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(json.dumps(ALPACA))
    check(lambda: load_conversations(path), path, None, None, ".jsonl, .json, .parquet or .csv", "a '.txt' file")


def test_undetectable_format(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "hello", "label": 1}) + "\n")
    check(
        lambda: load_conversations(path),
        path,
        1,
        None,
        "a record in a known format",
        "got an object with keys text, label",
    )


def test_mixed_formats_record_5_is_sharegpt_in_an_alpaca_file(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ALPACA] * 4 + [SHAREGPT]))
    check(lambda: load_conversations(path), path, 5, "instruction", "an alpaca record", "got a sharegpt record")


def test_mixed_formats_with_explicit_format(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([SHAREGPT]))
    check(lambda: load_conversations(path, format="alpaca"), path, 0, "instruction", "format='alpaca'", "sharegpt")


def test_load_conversations_on_preference_data(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(PREF) + "\n")
    check(
        lambda: load_conversations(path), path, 1, None, "conversation data", "preference data", "use load_preferences"
    )


def test_load_preferences_on_conversation_data(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")
    check(lambda: load_preferences(path), path, 1, None, "preference data", "alpaca data", "use load_conversations")


def test_explicit_format_of_the_wrong_kind(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")
    check(lambda: load_conversations(path, format="hh"), path, None, None, "format='hh'", "use load_preferences")


def test_unknown_format_name(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")
    check(lambda: load_conversations(path, format="vicuna"), path, None, None, "format to be one of auto, alpaca")


def test_split_on_a_single_file(tmp_path):
    path = tmp_path / "convs.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n")
    check(lambda: load_conversations(path, split="test"), path, None, None, "no split other than 'train'", "'test'")


def test_csv_missing_a_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input\nAdd 2 and 3,\n")
    check(lambda: load_conversations(path), path, None, "output", "a column 'output'", "columns instruction, input")


def test_csv_row_with_wrong_number_of_cells(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\na,,b\nc,d\n")
    check(lambda: load_conversations(path), path, 1, None, "3 cells, one per header column", "2 cells")


def test_csv_cell_with_invalid_json_list(tmp_path):
    path = tmp_path / "data.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["messages"], ['[{"role": "user", "content": "a"}, {"role": ']])
    check(lambda: load_conversations(path), path, 0, "messages", "a JSON list of messages in the cell", "invalid JSON")


def test_csv_header_only(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\n")
    check(lambda: load_conversations(path), path, None, None, "at least one record after the header")


def test_parquet_that_is_not_parquet(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "data.parquet"
    path.write_text("not parquet at all")
    check(lambda: load_conversations(path), path, None, None, "a valid parquet file")


def test_parquet_bad_record_uses_0_based_index(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist([ALPACA, ALPACA, {**ALPACA, "output": ""}]), path)
    check(lambda: load_conversations(path), path, 2, "output", "a non-empty assistant reply")


def test_memory_record_not_an_object():
    check(lambda: load_conversations([ALPACA, "text"]), "<memory>", 1, None, "a JSON object", "got 'text'")


def test_memory_empty_list():
    check(lambda: load_conversations([]), "<memory>", None, None, "at least one record")


def test_hub_dataset_that_cannot_be_fetched(monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    e = check(
        lambda: load_conversations("someone/chats"),
        "someone/chats",
        None,
        None,
        "could not be fetched",
        "OfflineModeIsEnabled",
        "work offline",
    )
    assert isinstance(e.__cause__, ConnectionError)


# ---------------------------------------------------------------- writing


def test_write_multi_turn_as_alpaca_names_the_record(tmp_path):
    out = tmp_path / "out.jsonl"
    convs = [
        Conversation([user("a"), assistant("b")], "in.jsonl:1"),
        Conversation([user("a"), assistant("b"), user("c"), assistant("d")], "in.jsonl:2"),
    ]
    check(lambda: write(convs, out, to="alpaca"), out, 1, "messages", "single-turn", "4 messages", "in.jsonl:2")
    assert not out.exists()


def test_write_conversation_as_preference(tmp_path):
    out = tmp_path / "out.jsonl"
    conv = Conversation([user("a"), assistant("b")])
    check(lambda: write([conv], out, to="preference"), out, 0, None, "a PreferencePair", "got a Conversation")


def test_write_pair_as_messages(tmp_path):
    out = tmp_path / "out.jsonl"
    pair = PreferencePair([user("q")], [assistant("a")], [assistant("b")])
    check(lambda: write([pair], out, to="messages"), out, 0, None, "a Conversation", "to='preference'")


def test_write_unknown_format(tmp_path):
    out = tmp_path / "out.jsonl"
    check(lambda: write([], out, to="csv"), out, None, None, "to to be one of messages, sharegpt, alpaca, preference")


def test_write_invalid_conversation(tmp_path):
    out = tmp_path / "out.jsonl"
    conv = Conversation([user("a"), {"role": "bot", "content": "b"}])
    check(lambda: write([conv], out), out, 0, "messages[1].role", "one of system, user, assistant", "got 'bot'")


def test_write_meta_colliding_with_a_format_field(tmp_path):
    out = tmp_path / "out.jsonl"
    conv = Conversation([user("a"), assistant("b")], meta={"messages": "x"})
    check(lambda: write([conv], out), out, 0, "meta.messages", "meta keys other than")


def test_write_meta_not_json_serialisable(tmp_path):
    out = tmp_path / "out.jsonl"
    conv = Conversation([user("a"), assistant("b")], meta={"when": object()})
    check(lambda: write([conv], out), out, 0, "meta", "JSON-serialisable")


def test_write_to_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "out.jsonl"  # a path under a regular file
    check(lambda: write([Conversation([user("a"), assistant("b")])], out), out, None, None, "a writable path")


def test_cli_bad_record_prints_one_line(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(messages(user("a"), user("b"))) + "\n")
    assert main(["convert", str(path), str(tmp_path / "o.jsonl"), "--to", "sharegpt"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {path}, line 1, field 'messages[1].role': expected 'assistant' " + (
        "(turns alternate user, assistant after an optional leading system); got 'user'\n"
    )


# ----------------------------------------------------------------------------------- issue 21: the readers' sweep


def finetune_cli(capsys, *argv):
    """``finetune ARGV`` in this process: exit status and stderr."""
    from finetune.cli import main as finetune_main

    code = finetune_main(list(argv))
    return code, capsys.readouterr().err


def one_line_error(err: str, *fragments):
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"


def test_lone_surrogate_in_content_names_line_and_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(messages(user("Hi"), assistant("Yo"))) + "\n" + '{"messages": [{"role": "user", "content": "a\\ud800b"}, '
                    '{"role": "assistant", "content": "c"}]}\n')
    check(lambda: load_conversations(path, format="messages"), path, 2, "messages[0].content",
          "valid Unicode text", "lone surrogate \\ud800")


def test_lone_surrogate_is_one_line_in_convert_and_render(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "c"}]}\n')
    code, err = finetune_cli(capsys, "convert", str(path), str(tmp_path / "out.jsonl"), "--to", "sharegpt")
    assert code == 2
    one_line_error(err, "data.jsonl, line 1, field 'messages[0].content'")
    assert not (tmp_path / "out.jsonl").exists()
    code, err = finetune_cli(capsys, "render", str(path), "--template", "llama3")
    assert code == 2
    one_line_error(err, "data.jsonl, line 1, field 'messages[0].content'", "lone surrogate")


def test_writer_refuses_a_weight_other_than_0_or_1(tmp_path):
    out = tmp_path / "out.jsonl"
    record = Conversation([user("Hi"), {**assistant("Hello"), "weight": 0.5}])
    check(lambda: write([record], out), out, 0, "messages[1].weight", "a weight of 0 or 1")


def test_nesting_100000_deep_is_refused_not_a_recursion_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + '{"instruction": "x", "output": "y", "extra": ' + deep + "}\n")
    check(lambda: load_conversations(path), path, 2, None, "nested at most 64 deep")
    array = tmp_path / "data.json"
    array.write_text("[" + json.dumps(ALPACA) + ', {"extra": ' + deep + "}]")
    check(lambda: load_conversations(array), array, 1, None, "nested at most 64 deep")


def test_nesting_just_past_the_limit_names_the_field(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "x", "output": "y", "extra": ' + "[" * 64 + "]" * 64 + "}\n")
    e = check(lambda: load_conversations(path), path, 1, "extra" + "[0]" * 63, "nested at most 64 deep")
    assert "deeper nesting" in str(e)


def test_dev_zero_named_jsonl_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "zero.jsonl"
    path.symlink_to("/dev/zero")
    check(lambda: load_conversations(path), path, None, None, "a regular file", "a character device")


def test_fifo_named_jsonl_is_refused_and_does_not_hang(tmp_path):
    import threading

    path = tmp_path / "pipe.jsonl"
    os.mkfifo(path)
    outcome = []

    def load():
        try:
            load_conversations(path)
        except DataFormatError as e:
            outcome.append(e)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # unblock the reader so the test process can exit, then fail
        with open(path, "w"):
            pass
        pytest.fail("reading a FIFO hung")
    assert outcome and "a regular file; got a FIFO (named pipe)" in str(outcome[0])


def test_hh_chosen_a_number_names_the_field(tmp_path):
    hh = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(hh) + "\n" + json.dumps({"chosen": 3, "rejected": hh["rejected"]}) + "\n")
    check(lambda: load_preferences(path), path, 2, "chosen", "an HH transcript string", "got a number (3)")


def test_preference_prompt_null_names_the_field(tmp_path):
    path = tmp_path / "pref.jsonl"
    hh_sides = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    path.write_text(json.dumps(PREF) + "\n" + json.dumps({"prompt": None, **hh_sides}) + "\n")
    check(lambda: load_preferences(path), path, 2, "prompt", "a string or a list of messages")


def test_bad_parquet_column_is_reported_against_the_input_and_its_column(tmp_path, capsys):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    table = pa.table({"instruction": ["x"], "output": ["y"], "created": [datetime.datetime(2024, 1, 2)]})
    pq.write_table(table, path)
    check(lambda: load_conversations(path), path, 0, "created", "a JSON value", "got a datetime")
    code, err = finetune_cli(capsys, "convert", str(path), str(tmp_path / "out.jsonl"), "--to", "messages")
    assert code == 2
    one_line_error(err, "in.parquet, record 0, field 'created'")


def test_bundled_path_outside_the_samples_is_refused(capsys):
    code, err = finetune_cli(capsys, "render", "bundled:../../../etc/passwd", "--template", "llama3")
    assert code == 2
    one_line_error(err, "bundled:../../../etc/passwd", "one of the bundled files", "suite_messages_eval.jsonl")
    code, err = finetune_cli(capsys, "convert", "bundled:..", "/tmp/never-written.jsonl", "--to", "messages")
    assert code == 2
    one_line_error(err, "bundled:..")


def test_limit_does_not_read_past_the_records_it_takes(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n{oops\n")
    assert len(load_conversations(path, limit=2)) == 2
    check(lambda: load_conversations(path), path, 3, None, "one valid JSON object per line")


def test_convert_does_not_import_torch(tmp_path):
    out = tmp_path / "out.jsonl"
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        f"assert main(['convert', 'bundled:suite_sharegpt_eval.jsonl', {str(out)!r}, '--to', 'messages']) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"
    assert out.stat().st_size > 0


def test_hh_transcript_ending_on_human_is_refused(tmp_path):
    path = tmp_path / "hh.jsonl"
    record = {
        "chosen": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: thanks",
        "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5",
    }
    path.write_text(json.dumps(record) + "\n")
    check(lambda: load_preferences(path), path, 1, "chosen", "ending on an '\\n\\nAssistant:' reply",
          "a last turn from Human: 'thanks'")


def test_record_level_system_beside_a_system_message_is_refused(tmp_path):
    path = tmp_path / "data.jsonl"
    record = messages(system("Be brief."), user("Hi"), assistant("Hello"))
    path.write_text(json.dumps({**record, "system": "Be kind."}) + "\n")
    check(lambda: load_conversations(path), path, 1, "system", "not both", "got both")


def test_record_level_system_must_be_a_string(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({**messages(user("Hi"), assistant("Hello")), "system": ["x"]}) + "\n")
    check(lambda: load_conversations(path), path, 1, "system", "a string", "a list of 1 item")


def test_duplicate_json_key_names_the_key(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ALPACA) + "\n" + '{"instruction": "a", "output": "b", "output": "c"}\n')
    check(lambda: load_conversations(path), path, 2, "output", "each key once per object", "'output' more than once")
    array = tmp_path / "data.json"
    array.write_text('[{"conversations": [{"from": "human", "from": "gpt", "value": "x"}]}]')
    check(lambda: load_conversations(array), array, 0, "from", "each key once per object")


def test_duplicate_csv_column_names_the_column(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output,output\nx,y,z\n")
    check(lambda: load_conversations(path), path, None, "output", "each column name once", "'output' twice")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_number_in_an_extra_field_is_refused(tmp_path, constant):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "x", "output": "y", "meta": {"score": ' + constant + "}}\n")
    check(lambda: load_conversations(path), path, 1, "meta.score", "a finite number")


def test_writer_writes_only_standard_json(tmp_path):
    record = Conversation([user("Hi"), assistant("Hello")], meta={"score": float("nan")})
    out = tmp_path / "out.jsonl"
    check(lambda: write([record], out), out, 0, "meta", "JSON-serialisable values", "not JSON compliant")
    assert not out.exists()


@pytest.mark.parametrize("weight", [2, -1, 0.5, 1.0, "0", [1]])
def test_weight_other_than_0_1_true_false_names_the_field(tmp_path, weight):
    path = tmp_path / "data.jsonl"
    record = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo", "weight": weight}]}
    path.write_text(json.dumps(record) + "\n")
    check(lambda: load_conversations(path), path, 1, "conversations[1].weight", "a weight of 0 or 1 (or false/true)")


def test_alpaca_writer_refuses_a_weighted_turn(tmp_path):
    out = tmp_path / "out.jsonl"
    record = Conversation([user("Hi"), {**assistant("Hello"), "weight": 0}])
    check(lambda: write([record], out, to="alpaca"), out, 0, "messages[1].weight", "without a weight for alpaca")


def test_truncated_json_list_names_the_cut_record(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" + json.dumps(SHAREGPT) + ", " + json.dumps(SHAREGPT)[:30])
    check(lambda: load_conversations(path), path, 1, None, "a complete JSON record", "the file ending inside it")


def test_oversized_line_is_refused_and_skippable(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 100)
    path = tmp_path / "data.jsonl"
    long = {"instruction": "x" * 200, "output": "y"}
    path.write_text(json.dumps(long) + "\n" + json.dumps(ALPACA) + "\n")
    check(lambda: load_conversations(path), path, 1, None, "a line of at most 100 bytes")
    assert len(load_conversations(path, skip_invalid=True)) == 1


def test_oversized_json_record_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1000)
    monkeypatch.setattr(sources, "_CHUNK", 64)
    path = tmp_path / "data.json"
    path.write_text(json.dumps([ALPACA, {"instruction": "x" * 5000, "output": "y"}]))
    check(lambda: load_conversations(path), path, 1, None, "records of at most 1000 bytes")


def test_skip_invalid_leaving_nothing_is_an_error(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("{oops\n" + json.dumps({"instruction": "", "output": "y"}) + "\n")
    check(lambda: load_conversations(path, skip_invalid=True), path, None, None, "at least one valid record",
          "none of 2")


def test_skip_invalid_does_not_skip_the_wrong_kind_of_data(tmp_path):
    path = tmp_path / "pref.jsonl"
    path.write_text(json.dumps(PREF) + "\n")
    check(lambda: load_conversations(path, skip_invalid=True), path, 1, None, "conversation data",
          "use load_preferences")
