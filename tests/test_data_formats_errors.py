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
    write,
)
from data_formats.cli import main

ROOT = Path(__file__).resolve().parent.parent


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
        None,
        ["an hh record", "got a preference record"],
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

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", denied)
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


def test_hub_dataset_offline_with_real_datasets(tmp_path):
    pytest.importorskip("datasets")
    code = (
        "from data_formats import load_conversations, DataFormatError\n"
        "try:\n    load_conversations('nobody-here/no-such-dataset')\n"
        "except DataFormatError as e:\n    print(e.file, e.record, e.field, e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert result.stdout.startswith("nobody-here/no-such-dataset None None "), result.stdout + result.stderr
    assert "could not be fetched" in result.stdout and "work offline" in result.stdout


def test_datasets_dir_missing_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.DatasetDict(test=datasets.Dataset.from_list([ALPACA])).save_to_disk(str(tmp_path / "dd"))
    check(
        lambda: load_conversations(tmp_path / "dd"), tmp_path / "dd", None, None, "a split named one of test", "'train'"
    )


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
