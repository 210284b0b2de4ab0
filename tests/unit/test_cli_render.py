"""The ``finetune`` console script: ``render`` and ``convert``, their output and their one-line user errors."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from finetune.cli import Command, build_parser, main  # noqa: E402
from finetune.models import load_tokenizer  # noqa: E402
from finetune.templates import render  # noqa: E402

MESSAGES_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": "Name the capital city of Cuba."},
            {"role": "assistant", "content": "Havana"},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Reverse the words: pen hammer nest"},
            {"role": "assistant", "content": "nest hammer pen"},
        ],
        "task": "reverse",
    },
]
ALPACA_RECORDS = [
    {"instruction": "Name the capital city of Cuba.", "input": "", "output": "Havana"},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Reverse the words: pen hammer nest", "input": "", "output": "nest hammer pen"},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def messages_file(tmp_path):
    return write_jsonl(tmp_path / "chat.jsonl", MESSAGES_RECORDS)


@pytest.fixture
def alpaca_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA_RECORDS)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_render_json_gives_exact_text_trained_text_and_counts(messages_file, capsys):
    code, out, err = run(capsys, "render", messages_file, "--template", "llama3", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 2
    assert rows[0]["origin"] == f"{messages_file}:1"
    assert rows[1]["origin"] == f"{messages_file}:2"
    assert rows[0]["text"] == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName the capital city of Cuba.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHavana<|eot_id|>"
    )
    assert rows[0]["trained_text"] == "Havana<|eot_id|>"
    assert rows[1]["text"] == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nReverse the words: pen hammer nest<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nnest hammer pen<|eot_id|>"
    )
    assert rows[1]["trained_text"] == "Hello.<|eot_id|>nest hammer pen<|eot_id|>"
    tokenizer = load_tokenizer("tiny")
    for row, record in zip(rows, MESSAGES_RECORDS, strict=True):
        input_ids, labels = render("llama3", record["messages"], tokenizer)
        assert row["num_tokens"] == len(input_ids)
        assert row["num_trained_tokens"] == sum(label != -100 for label in labels)
        assert 0 < row["num_trained_tokens"] < row["num_tokens"]
        assert row["input_ids"] == input_ids == tokenizer(row["text"], add_special_tokens=False).input_ids
        assert row["tokens"] == tokenizer.convert_ids_to_tokens(input_ids)
        assert row["trained"] == [int(label != -100) for label in labels]
    # Which tokens are trained, readable: the reply and <|eot_id|>, not the header before it.
    trained = [token for token, flag in zip(rows[0]["tokens"], rows[0]["trained"], strict=True) if flag]
    assert tokenizer.convert_tokens_to_string(trained) == "Havana<|eot_id|>"
    assert rows[0]["tokens"][-len(trained) - 1] == "ĊĊ"


def test_render_text_of_alpaca_data_with_limit(alpaca_file, capsys):
    """Alpaca records read through data_formats (instruction + blank line + input) render with the Alpaca prompts;
    the tiny tokenizer's own BOS/EOS are used."""
    code, out, err = run(capsys, "render", alpaca_file, "--template", "alpaca", "--limit", "2")
    assert code == 0, err
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    assert [h.split(":")[0] for h in headers] == [f"==> {alpaca_file}"] * 2
    assert headers[0].startswith(f"==> {alpaca_file}:1: ") and headers[1].startswith(f"==> {alpaca_file}:2: ")
    assert (
        "<|begin_of_text|>Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nName the capital city of Cuba.\n\n### Response:Havana<|end_of_text|>\n"
    ) in out
    assert (
        "<|begin_of_text|>Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\nTranslate to French."
        "\n\n### Input:\nGood morning\n\n### Response:Bonjour<|end_of_text|>\n"
    ) in out
    assert "Reverse the words" not in out


def test_render_limit_zero_prints_nothing(messages_file, capsys):
    assert run(capsys, "render", messages_file, "--template", "chatml", "--limit", "0") == (0, "", "")


def test_render_vicuna_json_trains_the_reply_not_the_role(alpaca_file, capsys):
    code, out, err = run(capsys, "render", alpaca_file, "--template", "vicuna_v1.1", "--json", "--limit", "1")
    assert code == 0, err
    row = json.loads(out)
    assert row["text"].endswith(" USER: Name the capital city of Cuba. ASSISTANT: Havana<|end_of_text|>")
    assert row["trained_text"] == " Havana<|end_of_text|>"


def one_error_line(err):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_unknown_template_is_a_one_line_error(messages_file, capsys):
    code, out, err = run(capsys, "render", messages_file, "--template", "llama9")
    assert (code, out) == (2, "")
    assert one_error_line(err).startswith("error: unknown template 'llama9'; expected one of llama3, llama2")


def test_missing_file_is_a_one_line_error(tmp_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    code, out, err = run(capsys, "render", missing, "--template", "llama3")
    assert (code, out) == (2, "")
    assert missing in one_error_line(err)


def test_malformed_data_names_file_line_and_field(tmp_path, capsys):
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [MESSAGES_RECORDS[0], {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}],
    )
    code, out, err = run(capsys, "render", bad, "--template", "llama3", "--json")
    assert (code, out) == (2, "")
    assert f"{bad}, line 2, field 'messages[1].role'" in one_error_line(err)


def test_tokenizer_template_without_chat_template_is_a_one_line_error(messages_file, capsys):
    code, _, err = run(capsys, "render", messages_file, "--template", "tokenizer")
    assert code == 2
    assert "needs a tokenizer that has a chat_template" in one_error_line(err)


def test_missing_model_is_a_one_line_error(messages_file, tmp_path, capsys):
    code, _, err = run(capsys, "render", messages_file, "--template", "llama3", "--model", str(tmp_path))
    assert code == 2
    one_error_line(err)


@pytest.mark.parametrize("command", [["chat", "--prompt", "hi"], ["eval"]])
def test_a_mistyped_run_directory_is_named_as_a_missing_directory_not_only_a_network_error(command, tmp_path, capsys):
    """``runs/sft-typo`` reads as a hub id ``owner/name``; offline, transformers would only say it could not connect."""
    missing = str(tmp_path / "runs" / "sft-typo")
    code, _, err = run(capsys, command[0], missing, *command[1:])
    assert code == 2
    assert one_error_line(err).startswith(f"error: {missing}: no such local directory, and as a hub model id: ")


def test_usage_errors_return_argparse_status(capsys):
    assert main([]) == 2
    assert main(["render", "x.jsonl"]) == 2  # --template is required
    assert main(["render", "x.jsonl", "--template", "llama3", "--limit", "-1"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


def test_convert_alpaca_to_messages(alpaca_file, tmp_path, capsys):
    out_path = tmp_path / "out" / "messages.jsonl"
    code, out, err = run(capsys, "convert", alpaca_file, str(out_path), "--to", "messages")
    assert code == 0, err
    assert out == f"wrote 3 messages records to {out_path}\n"
    rows = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Translate to French.\n\nGood morning", "input": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]


def test_convert_with_explicit_from_and_bad_to(alpaca_file, tmp_path, capsys):
    out_path = str(tmp_path / "sharegpt.jsonl")
    assert run(capsys, "convert", alpaca_file, out_path, "--to", "sharegpt", "--from", "alpaca")[0] == 0
    code, out, err = run(capsys, "convert", alpaca_file, out_path, "--to", "yaml")
    assert (code, out) == (2, "")
    assert "'yaml'" in one_error_line(err)
    code, _, err = run(capsys, "convert", alpaca_file, out_path, "--to", "messages", "--from", "sharegpt")
    assert code == 2
    one_error_line(err)


def test_a_new_subcommand_is_one_entry(capsys):
    """``export``, ``chat``, ``eval`` and ``bench`` plug in as a Command each, without touching the parser code."""
    seen = []

    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run_dir")

    def go(args: argparse.Namespace) -> int:
        seen.append(args.run_dir)
        return 0

    parser = build_parser([Command("export", "export a run", add, go)])
    args = parser.parse_args(["export", "runs/sft"])
    assert args.command.run(args) == 0 and seen == ["runs/sft"]


def test_render_reads_bundled_samples(capsys):
    code, out, err = run(capsys, "render", "bundled:suite_messages_train.jsonl", "--template", "llama3", "--limit", "1")
    assert code == 0, err
    assert out.startswith("==> ") and "<|begin_of_text|>" in out


def test_a_record_the_template_cannot_render_is_named(messages_file, capsys):
    code, out, err = run(capsys, "render", messages_file, "--template", "alpaca")
    assert code == 2 and out.startswith(f"==> {messages_file}:1: ")  # the first record renders, the second cannot
    assert one_error_line(err).startswith(f"error: {messages_file}:2: alpaca is a single-turn template")
