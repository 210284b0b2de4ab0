"""data_formats: every reader, source and writer producing and keeping the canonical form (errors are in
test_data_formats_errors.py)."""

import csv
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest

import data_formats
from data_formats import (
    Conversation,
    DataFormatError,
    PreferencePair,
    convert,
    detect_format,
    load_conversations,
    load_preferences,
    write,
)
from data_formats.cli import main

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "data_formats" / "samples"


def jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "task": "add", "answer": "5"}
SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello."},
        {"from": "user", "value": "Name a colour."},
        {"from": "assistant", "value": "Red."},
    ],
    "id": "abc",
}
MESSAGES = {"messages": [system("Be brief."), user("Hi"), assistant("Hello.")], "task": "greet"}
PREFERENCE = {
    "prompt": [system("Be brief."), user("2+2?")],
    "chosen": [assistant("4")],
    "rejected": [assistant("5")],
    "task": "add",
}
HH = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 4",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: What is 2+2?\n\nAssistant: 22",
}


# ---------------------------------------------------------------- readers


def test_alpaca_joins_instruction_and_input_and_keeps_meta(tmp_path):
    (conv,) = load_conversations(jsonl(tmp_path / "a.jsonl", [ALPACA]))
    assert conv.messages == [{**user("Add the numbers.\n\n2 and 3"), "input": "2 and 3"}, assistant("5")]
    assert conv.meta == {"task": "add", "answer": "5"}
    assert conv.origin == f"{tmp_path / 'a.jsonl'}:1"


def test_alpaca_without_input_and_with_system(tmp_path):
    records = [
        {"instruction": "Say hi.", "input": "", "output": "hi", "system": "You are terse."},
        {"instruction": "Say bye.", "output": "bye", "input": None, "system": ""},
        {"instruction": "Say yo.", "input": "   ", "output": "yo"},
    ]
    a, b, c = load_conversations(jsonl(tmp_path / "a.jsonl", records))
    assert a.messages == [system("You are terse."), user("Say hi."), assistant("hi")]
    assert b.messages == [user("Say bye."), assistant("bye")]
    # Stanford's rule is input != "": a whitespace-only input is an input.
    assert c.messages == [{**user("Say yo.\n\n   "), "input": "   "}, assistant("yo")]


def test_sharegpt_maps_speakers_including_user_assistant_aliases(tmp_path):
    (conv,) = load_conversations(jsonl(tmp_path / "s.jsonl", [SHAREGPT]))
    assert conv.messages == [
        system("Be brief."),
        user("Hi"),
        assistant("Hello."),
        user("Name a colour."),
        assistant("Red."),
    ]
    assert conv.meta == {"id": "abc"}


def test_sharegpt_record_level_system_prompt(tmp_path):
    record = {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"}],
    }
    (conv,) = load_conversations([record])
    assert conv.messages == [system("Be kind."), user("Hi"), assistant("Hey")]
    assert conv.meta == {}


def test_messages_multi_turn_with_system(tmp_path):
    (conv,) = load_conversations(jsonl(tmp_path / "m.jsonl", [MESSAGES]))
    assert conv.messages == MESSAGES["messages"]
    assert conv.meta == {"task": "greet"}


def test_message_items_extra_keys_are_ignored():
    record = {"messages": [{"role": "user", "content": "Hi", "name": "x"}, {"role": "assistant", "content": "Yo"}]}
    assert load_conversations([record])[0].messages == [user("Hi"), assistant("Yo")]


def test_preference_trl_conversational(tmp_path):
    (pair,) = load_preferences(jsonl(tmp_path / "p.jsonl", [PREFERENCE]))
    assert pair == PreferencePair(
        [system("Be brief."), user("2+2?")],
        [assistant("4")],
        [assistant("5")],
        f"{tmp_path / 'p.jsonl'}:1",
        {"task": "add"},
    )


def test_preference_plain_strings():
    (pair,) = load_preferences([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("2+2?")], [assistant("4")], [assistant("5")])
    assert pair.origin == "<memory>[0]"


def test_preference_full_conversations_repeating_the_prompt():
    record = {
        "prompt": "2+2?",
        "chosen": [user("2+2?"), assistant("4")],
        "rejected": [user("2+2?"), assistant("5")],
    }
    (pair,) = load_preferences([record])
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("2+2?")], [assistant("4")], [assistant("5")])


def test_preference_implicit_prompt_is_the_common_prefix():
    record = {
        "chosen": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("4")],
        "rejected": [user("Hi"), assistant("Hello"), user("2+2?"), assistant("5")],
        "score_chosen": 9.0,
    }
    (pair,) = load_preferences([record])
    assert pair.prompt == [user("Hi"), assistant("Hello"), user("2+2?")]
    assert (pair.chosen, pair.rejected) == ([assistant("4")], [assistant("5")])
    assert pair.meta == {"score_chosen": 9.0}


def test_hh_transcripts_split_into_prompt_and_replies(tmp_path):
    (pair,) = load_preferences(jsonl(tmp_path / "hh.jsonl", [HH]))
    assert pair.prompt == [user("Hi there"), assistant("Hello!"), user("What is 2+2?")]
    assert (pair.chosen, pair.rejected) == ([assistant("4")], [assistant("22")])


def test_hh_without_leading_blank_line():
    record = {"chosen": "Human: Hi\n\nAssistant: Hello", "rejected": "Human: Hi\n\nAssistant: Go away"}
    assert load_preferences([record])[0].prompt == [user("Hi")]


@pytest.mark.parametrize(
    "record, fmt",
    [
        (ALPACA, "alpaca"),
        (SHAREGPT, "sharegpt"),
        (MESSAGES, "messages"),
        (PREFERENCE, "preference"),
        ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}, "preference"),
        (HH, "hh"),
    ],
    ids=["alpaca", "sharegpt", "messages", "preference", "preference-implicit-prompt", "hh"],
)
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_detect_format_rejects_unknown_keys():
    with pytest.raises(DataFormatError, match="keys text, label"):
        detect_format({"text": "x", "label": 1})


def test_explicit_format_skips_detection(tmp_path):
    assert load_conversations(jsonl(tmp_path / "m.jsonl", [MESSAGES]), format="messages")[0].messages[1] == user("Hi")
    assert load_preferences([HH], format="hh")[0].chosen == [assistant("4")]


# ---------------------------------------------------------------- sources


def test_json_list_origin_is_index(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([ALPACA, ALPACA]))
    convs = load_conversations(path)
    assert [c.origin for c in convs] == [f"{path}[0]", f"{path}[1]"]


def test_json_object_holding_one_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [MESSAGES]}))
    assert load_conversations(str(path))[0].messages == MESSAGES["messages"]


def test_jsonl_skips_blank_lines_and_counts_them_in_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("\n" + json.dumps(ALPACA) + "\n\n   \n" + json.dumps(ALPACA) + "\n")
    assert [c.origin for c in load_conversations(path)] == [f"{path}:2", f"{path}:5"]


def test_jsonl_with_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ALPACA).encode() + b"\r\n")
    assert len(load_conversations(path)) == 1


def test_parquet_with_message_lists(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist([MESSAGES, {"messages": [user("a"), assistant("b")], "task": None}]), path)
    first, second = load_conversations(path)
    assert first.messages == MESSAGES["messages"] and first.origin == f"{path}[0]"
    assert second.messages == [user("a"), assistant("b")]


def test_parquet_preferences(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([PREFERENCE]), path)
    assert load_preferences(path)[0].chosen == [assistant("4")]


def test_csv_alpaca_and_json_cells(tmp_path):
    path = tmp_path / "a.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output", "task"])
        w.writerow(["Add, please", "1\n2", "3", "add"])
    (conv,) = load_conversations(path)
    assert conv.messages == [{**user("Add, please\n\n1\n2"), "input": "1\n2"}, assistant("3")]
    assert conv.meta == {"task": "add"} and conv.origin == f"{path}[0]"

    path = tmp_path / "m.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        w.writerow([json.dumps(MESSAGES["messages"])])
    assert load_conversations(path)[0].messages == MESSAGES["messages"]


def test_csv_preference_cells_with_lists_or_text(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["[1, 2] sorted?", json.dumps([assistant("yes")]), "no"])
    (pair,) = load_preferences(path)
    assert pair.prompt == [user("[1, 2] sorted?")]
    assert (pair.chosen, pair.rejected) == ([assistant("yes")], [assistant("no")])


def test_memory_source_origins():
    convs = load_conversations([ALPACA, ALPACA])
    assert [c.origin for c in convs] == ["<memory>[0]", "<memory>[1]"]


def test_hub_id_goes_through_load_dataset(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [MESSAGES]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    (conv,) = load_conversations("someone/chats")
    assert calls == [("someone/chats", "train")]
    assert conv.origin == "someone/chats:train[0]"
    load_conversations("someone/chats", split="test")
    assert calls[-1] == ("someone/chats", "test")


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="no bundled samples")
@pytest.mark.parametrize("name", sorted(p.name for p in SAMPLES.glob("*.jsonl")) if SAMPLES.is_dir() else [])
def test_bundled_samples_load(name):
    path = SAMPLES / name
    records = load_preferences(path) if "preference" in name else load_conversations(path)
    assert records and all(r.meta for r in records)


# ---------------------------------------------------------------- writers and round trips


def test_alpaca_to_sharegpt_and_back(tmp_path):
    convs = load_conversations(
        jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Hi", "output": "Yo", "system": "S"}])
    )
    assert write(convs, tmp_path / "s.jsonl", to="sharegpt") == 2
    rows = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "conversations": [{"from": "human", "value": "Add the numbers.\n\n2 and 3", "input": "2 and 3"},
                          {"from": "gpt", "value": "5"}],
        "task": "add",
        "answer": "5",
    }
    again = load_conversations(tmp_path / "s.jsonl")
    # The joined turn and the Alpaca input beside it both survive (the alpaca template needs the input).
    assert [c.messages for c in again] == [c.messages for c in convs]
    assert [c.meta for c in again] == [c.meta for c in convs]


def test_sharegpt_to_messages_and_back(tmp_path):
    convs = load_conversations([SHAREGPT])
    write(convs, tmp_path / "m.jsonl")
    again = load_conversations(tmp_path / "m.jsonl")
    assert again[0].messages == convs[0].messages and again[0].meta == {"id": "abc"}
    write(again, tmp_path / "s.jsonl", to="sharegpt")
    assert json.loads((tmp_path / "s.jsonl").read_text())["conversations"][0] == {
        "from": "system",
        "value": "Be brief.",
    }


def test_messages_to_alpaca_and_back(tmp_path):
    convs = load_conversations([{"messages": [system("S"), user("Q"), assistant("A")], "task": "t"}])
    write(convs, tmp_path / "a.jsonl", to="alpaca")
    row = json.loads((tmp_path / "a.jsonl").read_text())
    assert row == {"instruction": "Q", "input": "", "output": "A", "system": "S", "task": "t"}
    assert load_conversations(tmp_path / "a.jsonl")[0].messages == convs[0].messages


def test_preferences_round_trip_from_hh(tmp_path):
    pairs = load_preferences([HH, {**HH, "rejected": HH["rejected"].replace("22", "five"), "id": 7}])
    assert write(pairs, tmp_path / "p.jsonl", to="preference") == 2
    row = json.loads((tmp_path / "p.jsonl").read_text().splitlines()[1])
    assert set(row) == {"prompt", "chosen", "rejected", "id"}
    again = load_preferences(tmp_path / "p.jsonl")
    assert [(p.prompt, p.chosen, p.rejected, p.meta) for p in again] == [
        (p.prompt, p.chosen, p.rejected, p.meta) for p in pairs
    ]


def test_write_is_atomic_and_keeps_the_old_file_on_error(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    multi = Conversation([user("a"), assistant("b"), user("c"), assistant("d")], "x.jsonl:3")
    with pytest.raises(DataFormatError):
        write([Conversation([user("a"), assistant("b")]), multi], out, to="alpaca")
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_write_creates_parent_directories_and_accepts_generators(tmp_path):
    out = tmp_path / "deep" / "dir" / "m.jsonl"
    assert write((c for c in load_conversations([MESSAGES])), out) == 1
    assert json.loads(out.read_text())["messages"] == MESSAGES["messages"]


# ---------------------------------------------------------------- error object, CLI, packaging


def test_error_message_matches_the_contract(tmp_path):
    path = tmp_path / "data.jsonl"
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    bad = {
        "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "bot", "value": "c"}]
    }
    jsonl(path, [good] * 11 + [bad])
    with pytest.raises(DataFormatError) as info:
        load_conversations(path)
    assert (
        str(info.value)
        == f"{path}, line 12, field 'conversations[2].from': expected one of human, gpt, system; got 'bot'"
    )
    e = info.value
    assert (e.file, e.record, e.field, e.expected) == (
        str(path),
        12,
        "conversations[2].from",
        "one of human, gpt, system",
    )
    assert isinstance(e, ValueError)


def test_error_constructor_positional_and_pickle():
    e = DataFormatError("x.jsonl", None, None, "one of the bundled files: a.jsonl")
    assert str(e) == "x.jsonl: expected one of the bundled files: a.jsonl"
    copy = pickle.loads(pickle.dumps(DataFormatError("d.json", 3, "output", "a string", "a number (1)")))
    assert str(copy) == "d.json, record 3, field 'output': expected a string; got a number (1)"


def test_convert_function_and_cli(tmp_path, capsys):
    src = jsonl(tmp_path / "a.jsonl", [ALPACA, ALPACA])
    assert convert(src, tmp_path / "m.jsonl", "messages") == 2
    assert main(["convert", str(src), str(tmp_path / "s.jsonl"), "--to", "sharegpt", "--from", "alpaca"]) == 0
    assert "wrote 2 sharegpt records" in capsys.readouterr().out
    assert load_conversations(tmp_path / "s.jsonl")[1].meta == {"task": "add", "answer": "5"}
    hh = jsonl(tmp_path / "hh.jsonl", [HH])
    assert convert(hh, tmp_path / "p.jsonl", "preference", "hh") == 1


def test_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.jsonl"), str(tmp_path / "o.jsonl"), "--to", "messages"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.jsonl" in err
    hh = jsonl(tmp_path / "hh.jsonl", [HH])
    assert main(["convert", str(hh), str(tmp_path / "o.jsonl"), "--to", "messages"]) == 2
    assert "--to preference" in capsys.readouterr().err


def test_python_dash_m_entry(tmp_path):
    src = jsonl(tmp_path / "a.jsonl", [ALPACA])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    ok = subprocess.run(
        [sys.executable, "-m", "data_formats", "convert", str(src), str(tmp_path / "o.jsonl"), "--to", "messages"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "data_formats", "convert", str(tmp_path / "nope.jsonl"), "o.jsonl", "--to", "messages"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr


def test_import_does_not_pull_torch_transformers_or_datasets():
    code = (
        "import sys, data_formats; "
        "bad = [m for m in ('torch', 'transformers', 'datasets', 'pyarrow') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api():
    assert set(data_formats.__all__) >= {
        "Conversation",
        "PreferencePair",
        "DataFormatError",
        "load_conversations",
        "load_preferences",
        "detect_format",
        "write",
        "convert",
    }


# ---------------------------------------------------------------- real-data conventions (issues 15 and 21)


def test_sharegpt_leading_gpt_turn_is_dropped_and_counted(tmp_path):
    """FastChat's ``preprocess`` drops a first turn that is not the human's; so do we, and the report counts it."""
    opening_on_gpt = {"conversations": [{"from": "gpt", "value": "Sure!"}, *SHAREGPT["conversations"][1:3]]}
    after_system = {"conversations": [SHAREGPT["conversations"][0], {"from": "gpt", "value": "x"},
                                      *SHAREGPT["conversations"][1:3]]}
    path = jsonl(tmp_path / "data.jsonl", [SHAREGPT, opening_on_gpt, after_system])
    report = data_formats.LoadReport()
    convs = load_conversations(path, report=report)
    assert convs[1].messages == [user("Hi"), assistant("Hello.")]
    assert convs[2].messages == [system("Be brief."), user("Hi"), assistant("Hello.")]
    assert report.changes == {"dropped a leading assistant turn": 2}
    assert (report.records, report.accepted) == (3, 3)
    assert "dropped a leading assistant turn: 2" in report.describe("train data")


def test_a_dropped_turn_of_a_skipped_record_is_not_counted(tmp_path):
    only_gpt = {"conversations": [{"from": "gpt", "value": "Sure!"}]}
    path = jsonl(tmp_path / "data.jsonl", [SHAREGPT, only_gpt])
    report = data_formats.LoadReport()
    assert len(load_conversations(path, skip_invalid=True, report=report)) == 1
    assert not report.changes and report.num_skipped == 1


def test_messages_record_level_system_becomes_the_system_message(tmp_path):
    path = jsonl(tmp_path / "data.jsonl", [{"messages": [user("Hi"), assistant("Yo")], "system": "Be brief.", "k": 1}])
    (conv,) = load_conversations(path)
    assert conv.messages == [system("Be brief."), user("Hi"), assistant("Yo")]
    assert conv.meta == {"k": 1}


def test_preference_and_hh_record_level_system_lead_the_prompt(tmp_path):
    pref = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "system": "Be brief."}
    implicit = {"chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")], "system": "S"}
    repeated = {"prompt": [user("2+2?")], "chosen": [user("2+2?"), assistant("4")], "rejected": [assistant("5")],
                "system": "S"}
    pairs = load_preferences(jsonl(tmp_path / "pref.jsonl", [pref, implicit, repeated]))
    assert pairs[0].prompt == [system("Be brief."), user("2+2?")]
    assert pairs[1].prompt == pairs[2].prompt == [system("S"), user("2+2?")]
    assert [p.chosen for p in pairs] == [[assistant("4")]] * 3
    (hh,) = load_preferences(jsonl(tmp_path / "hh.jsonl", [{**HH, "system": "S"}]))
    assert hh.prompt[0] == system("S") and hh.meta == {}


def test_hh_null_prompt_is_no_prompt(tmp_path):
    (pair,) = load_preferences(jsonl(tmp_path / "hh.jsonl", [{**HH, "prompt": None}]))
    assert pair.prompt[-1] == user("What is 2+2?") and pair.meta == {}


def test_turn_weight_is_kept_as_0_or_1_and_written_back(tmp_path):
    record = {"conversations": [
        {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello", "weight": 0},
        {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Hello!", "weight": True},
        {"from": "human", "value": "Once more", "weight": None}, {"from": "gpt", "value": "Hi", "weight": False},
    ]}
    (conv,) = load_conversations([record])
    assert [m.get("weight") for m in conv.messages] == [None, 0, None, 1, None, 0]
    assert all(type(m["weight"]) is int for m in conv.messages if "weight" in m)
    for to in ("messages", "sharegpt"):
        out = tmp_path / f"{to}.jsonl"
        write([conv], out, to=to)
        assert load_conversations(out)[0].messages == conv.messages
    msgs = load_conversations([{"messages": [user("Hi"), {**assistant("Yo"), "weight": 0}]}])[0].messages
    assert msgs[1] == {"role": "assistant", "content": "Yo", "weight": 0}
    (pair,) = load_preferences([{"prompt": [{**user("q"), "weight": 1}], "chosen": "a", "rejected": "b"}])
    assert pair.prompt == [{**user("q"), "weight": 1}]


def test_skip_invalid_counts_per_reason_and_names_each_record(tmp_path):
    bad_role = {"conversations": [{"from": "bot", "value": "x"}]}
    empty_reply = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " "}]}
    empty_reply_later = {"conversations": [*SHAREGPT["conversations"][1:3], {"from": "human", "value": "Hi"},
                                           {"from": "gpt", "value": ""}]}
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(SHAREGPT), json.dumps(bad_role), "{oops", json.dumps(empty_reply),
             json.dumps(empty_reply_later), json.dumps(SHAREGPT)]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataFormatError, match="line 2, field 'conversations\\[0\\].from'"):
        load_conversations(path)
    report = data_formats.LoadReport()
    convs = load_conversations(path, skip_invalid=True, report=report)
    assert [c.origin for c in convs] == [f"{path}:1", f"{path}:6"]
    assert (report.records, report.accepted, report.num_skipped) == (6, 2, 4)
    assert report.skipped == {
        "field 'conversations[].value': expected a non-empty assistant reply": 2,
        "field 'conversations[].from': expected one of human, gpt, system": 1,
        "expected one valid JSON object per line (JSON Lines)": 1,
    }
    assert [origin for origin, _, _ in report.rejects] == [f"{path}:{n}" for n in (2, 3, 4, 5)]
    rejects = tmp_path / "rejects.jsonl"
    assert data_formats.write_rejects(rejects, [report]) == 4
    rows = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert rows[0] == {
        "origin": f"{path}:2",
        "reason": "field 'conversations[].from': expected one of human, gpt, system",
        "error": f"{path}, line 2, field 'conversations[0].from': expected one of human, gpt, system; got 'bot'",
    }
    assert "skipped 4 invalid: 2 x field 'conversations[].value': expected a non-empty assistant reply; 1 x" in (
        report.describe()
    )


def test_skip_invalid_detects_the_format_from_the_first_good_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "no format"}\n' + json.dumps(ALPACA) + "\n")
    (conv,) = load_conversations(path, skip_invalid=True)
    assert conv.origin.endswith(":2")


def test_truncated_json_list_keeps_the_complete_records_with_skip_invalid(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" + json.dumps(SHAREGPT) + ",\n " + json.dumps(SHAREGPT)[:40])
    report = data_formats.LoadReport()
    assert len(load_conversations(path, skip_invalid=True, report=report)) == 1
    assert report.skipped == {"expected a complete JSON record": 1}


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_streamed_json_equals_json_loads_at_every_chunk_size(tmp_path, monkeypatch, chunk):
    """Records cut anywhere by the read size (inside strings, escapes, numbers, multi-byte characters) decode the
    same as ``json.loads`` of the whole file."""
    from data_formats import sources

    monkeypatch.setattr(sources, "_CHUNK", chunk)
    records = [
        {**ALPACA, "n": 12345, "f": -1.5e-7, "t": True, "z": None},
        {"instruction": "é ü 漢字 😀 \"quoted\" \\ back\nslash \u2028", "output": "\t\u0001", "list": [1, [2, [3]]]},
        {"instruction": "x", "output": "y", "big": 10**30},
    ]
    text = "\ufeff[\n" + ",\n".join(json.dumps(r, ensure_ascii=a) for r, a in zip(records, (True, False, True))) + "\n]"
    path = tmp_path / "data.json"
    path.write_bytes(text.encode("utf-8"))
    convs = load_conversations(path)
    assert [c.meta for c in convs] == [{k: v for k, v in r.items() if k not in ("instruction", "input", "output")}
                                       for r in records]
    assert convs[1].messages[0]["content"] == records[1]["instruction"]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": records}))
    assert [c.meta for c in load_conversations(wrapped)] == [c.meta for c in convs]


def test_limit_reads_only_what_it_takes(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("[" + json.dumps(ALPACA) + ", {oops")
    assert len(load_conversations(path, limit=1)) == 1
    assert load_conversations(path, limit=0) == []


def test_convert_streams_with_skip_invalid_and_writes_rejects_beside_the_output(tmp_path, capsys):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n{oops\n")
    out = tmp_path / "out.jsonl"
    assert main(["convert", str(path), str(out), "--to", "messages", "--skip-invalid"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 1 messages records" in printed and "skipped 1 invalid" in printed
    rejects = Path(f"{out}.rejects.jsonl")
    assert json.loads(rejects.read_text())["origin"] == f"{path}:2"


# ---------------------------------------------------------------- finetune reading through data_formats


def test_bundled_names_resolve_only_to_shipped_files():
    from finetune.data import bundled_files, resolve_source

    assert "suite_messages_eval.jsonl" in bundled_files()
    assert resolve_source("bundled:suite_messages_eval.jsonl") == str(SAMPLES / "suite_messages_eval.jsonl")
    for name in ("../canonical.py", "..", "", "/etc/passwd", "samples/suite_messages_eval.jsonl"):
        with pytest.raises(DataFormatError, match="one of the bundled files"):
            resolve_source("bundled:" + name)


def test_render_accepts_bundled_and_reads_only_limit_records(tmp_path, capsys):
    from finetune.cli import main as finetune_main

    assert finetune_main(["render", "bundled:suite_messages_eval.jsonl", "--template", "llama3", "--limit", "1"]) == 0
    assert capsys.readouterr().out.count("==> ") == 1
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(MESSAGES) + "\n{not json\n")
    assert finetune_main(["render", str(path), "--template", "llama3", "--limit", "1", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_finetune_loads_count_and_list_what_skip_invalid_skipped(tmp_path, capsys):
    from finetune.data import load_conversations as finetune_load
    from finetune.data import write_rejects

    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(MESSAGES) + "\n{oops\n")
    reports = []
    assert len(finetune_load(str(path), skip_invalid=True, reports=reports, name="train data")) == 1
    assert f"train data: 1 of 2 records from {path}; skipped 1 invalid" in capsys.readouterr().out
    written = write_rejects(tmp_path / "run", reports)
    assert written == tmp_path / "run" / "rejects.jsonl"
    assert json.loads(written.read_text())["origin"] == f"{path}:2"
    assert write_rejects(tmp_path / "other", [data_formats.LoadReport()]) is None


def test_an_alpaca_input_survives_conversion_to_messages_and_sharegpt_and_back(tmp_path):
    """Converted Alpaca data keeps each record's input on its user turn, so the alpaca template still renders the
    with-input prompt (PROMPT_DICT["prompt_input"]) from it, and converting back gives the original record."""
    source = tmp_path / "alpaca.jsonl"
    records = [{"instruction": "Translate.", "input": "Good morning", "output": "Bonjour"},
               {"instruction": "Say hi.", "input": "", "output": "Hi"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    original = load_conversations(source)
    for to in ("messages", "sharegpt"):
        converted = tmp_path / f"{to}.jsonl"
        convert(source, converted, to=to)
        assert [c.messages for c in load_conversations(converted)] == [c.messages for c in original]
        back = tmp_path / f"{to}-back.jsonl"
        convert(converted, back, to="alpaca")
        assert [json.loads(line) for line in back.read_text().splitlines()] == records
    assert original[0].messages[0] == {"role": "user", "content": "Translate.\n\nGood morning", "input": "Good morning"}


@pytest.mark.parametrize(("message", "fragment"), [
    ({"role": "assistant", "content": "x\n\ny", "input": "y"}, "an input only on a user turn"),
    ({"role": "user", "content": "Translate. Good morning", "input": "Good morning"}, "the end of the turn's content"),
    ({"role": "user", "content": "x\n\n1", "input": 1}, "a string"),
])
def test_a_turn_input_that_is_not_the_end_of_a_user_turn_is_refused(tmp_path, message, fragment):
    path = tmp_path / "bad.jsonl"
    turns = [message, {"role": "assistant", "content": "ok"}] if message["role"] == "user" else [
        {"role": "user", "content": "q"}, message]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(DataFormatError, match=fragment) as info:
        load_conversations(path)
    index = 0 if message["role"] == "user" else 1
    assert (info.value.record, info.value.field) == (1, f"messages[{index}].input")
