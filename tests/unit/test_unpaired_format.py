"""The unpaired preference format (KTO's data; TRL's prompt/completion/label): what it reads, what pairs become, and
errors that name file, record and field."""

import json

import pytest

from data_formats import (
    DataFormatError,
    UnpairedExample,
    convert,
    detect_format,
    load_conversations,
    load_preferences,
    load_unpaired,
)

USER = [{"role": "user", "content": "What is 2 + 2?"}]
FOUR = [{"role": "assistant", "content": "4"}]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reads_strings_messages_and_whole_conversations():
    examples = load_unpaired([
        {"prompt": "What is 2 + 2?", "completion": "4", "label": True, "task": "add"},
        {"prompt": USER, "completion": [{"role": "assistant", "content": "5"}], "label": False},
        {"prompt": USER, "completion": USER + FOUR, "label": True},  # repeats the prompt: cut off
        {"prompt": "Hi", "completion": "Hello", "label": True, "system": "Be terse."},
    ])
    assert [e.desirable for e in examples] == [True, False, True, True]
    assert examples[0] == UnpairedExample(USER, FOUR, True, "<memory>[0]", {"task": "add"})
    assert examples[2].prompt == USER and examples[2].completion == FOUR
    assert examples[3].prompt[0] == {"role": "system", "content": "Be terse."}


def test_pairs_become_a_desirable_and_an_undesirable_example():
    pairs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5", "answer": "4"}]
    chosen, rejected = load_unpaired(pairs)
    assert (chosen.desirable, chosen.completion) == (True, FOUR)
    assert (rejected.desirable, rejected.completion[0]["content"]) == (False, "5")
    assert chosen.origin == rejected.origin == "<memory>[0]" and rejected.meta == {"answer": "4"}


def test_detected_from_the_completion_field():
    assert detect_format({"prompt": "x", "completion": "y", "label": True}) == "unpaired"


@pytest.mark.parametrize("record, field, expected", [
    ({"prompt": "x", "completion": "y"}, "label", "true (a desirable completion) or false"),
    ({"prompt": "x", "completion": "y", "label": "yes"}, "label", "true (a desirable completion) or false"),
    ({"prompt": "x", "completion": "y", "label": 1}, "label", "true (a desirable completion) or false"),
    ({"prompt": "x", "completion": "y", "label": None}, "label", "true (a desirable completion) or false"),
    ({"completion": "y", "label": True}, "prompt", "a string or a list of messages"),
    ({"prompt": "x", "completion": "  ", "label": True}, "completion", "a non-empty assistant reply"),
    ({"prompt": "x", "completion": None, "label": True}, "completion", "a string or a list of messages"),
    ({"prompt": "x", "completion": 3, "label": True}, "completion", "a string or a list of messages"),
    ({"prompt": "x", "completion": [{"role": "user", "content": "y"}], "label": True}, "completion[0].role",
     "'assistant'"),
    ({"prompt": USER + FOUR, "completion": "y", "label": True}, "prompt[1].role", "'user'"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, field, expected):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "ok", "completion": "fine", "label": True}, record])
    with pytest.raises(DataFormatError) as caught:
        load_unpaired(path)
    error = caught.value
    assert (error.file, error.record, error.field) == (str(path), 2, field)
    assert expected in error.expected
    assert str(error).startswith(f"{path}, line 2, field {field!r}: expected")


def test_skip_invalid_counts_the_bad_record_and_keeps_the_rest(tmp_path):
    from data_formats import LoadReport

    path = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                {"prompt": "a", "completion": "b", "label": "no"}])
    report = LoadReport()
    examples = load_unpaired(path, skip_invalid=True, report=report)
    assert len(examples) == 1 and report.rejects[0][0] == f"{path}:2"


def test_the_wrong_kind_of_data_is_one_error_with_a_hint(tmp_path):
    unpaired = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": True}])
    with pytest.raises(DataFormatError, match="preference data"):
        load_preferences(unpaired)
    with pytest.raises(DataFormatError, match="conversation data"):
        load_conversations(unpaired)
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}])
    with pytest.raises(DataFormatError, match="unpaired preference data") as caught:
        load_unpaired(sft)
    assert "load_conversations" in str(caught.value)


def test_one_file_holds_one_format(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b", "label": True},
                                                  {"prompt": "a", "chosen": "b", "rejected": "c"}])
    with pytest.raises(DataFormatError) as caught:
        load_unpaired(path)
    assert caught.value.record == 2 and "an unpaired record" in caught.value.expected


def test_convert_splits_pairs_into_unpaired_examples_that_read_back(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}])
    out = tmp_path / "kto.jsonl"
    assert convert(pairs, out, to="unpaired") == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in rows] == [True, False] and rows[0]["completion"] == FOUR
    assert [(e.desirable, e.completion) for e in load_unpaired(out)] == [(True, FOUR),
                                                                        (False, [{"role": "assistant", "content": "5"}])]
    with pytest.raises(DataFormatError, match="unpaired output needs"):
        convert(write_jsonl(tmp_path / "sft.jsonl", [{"instruction": "a", "output": "b"}]), tmp_path / "x.jsonl",
                to="unpaired")
