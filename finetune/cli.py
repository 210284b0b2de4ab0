"""The ``finetune`` console script.

Every subcommand is a :class:`Command` listed in :data:`COMMANDS`: a name, a one-line help, a function that adds its
arguments and a function that runs it and returns the exit status. The training stages (``sft``, ``reward``,
``rejection-sampling``, ``dpo``, ``kto``, ``ppo``) are commands too, running ``finetune.launch.STAGES``: the same code as
``recipes/NAME.py``, with the same options (``finetune sft --help``); on several processes
``accelerate launch -m finetune.cli sft ...``. Adding one (``export``, ``chat``, ``eval``,
``bench``) is writing those two functions and appending a line to :data:`COMMANDS`; nothing else changes.

A user error (bad data, unknown template, missing file or model) prints one ``error: ...`` line on stderr and exits
with status 2, without a traceback.

    finetune sft --train.max_steps=20 --output_dir runs/sft
    finetune render data.jsonl --template llama3 --json --limit 5
    finetune convert alpaca.jsonl messages.jsonl --to messages
    finetune eval runs/sft --tasks finetune_suite
    finetune serve runs/sft --port 8000
    finetune push runs/sft --repo_id me/tiny-sft
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with what the user asked for (not a bug): reported as one ``error:`` line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand of ``finetune``."""

    name: str
    """What the user types after ``finetune``."""
    help: str
    """One line for ``finetune --help``."""
    add_arguments: Callable[[argparse.ArgumentParser], None]
    """Adds the subcommand's arguments to its parser."""
    run: Callable[[argparse.Namespace], int]
    """Runs it on the parsed arguments; returns the exit status."""


# ----------------------------------------------------------------------------------------------------------- render


def _render_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", help="a data file or directory that data_formats reads (alpaca, sharegpt, messages), or bundled:FILE"
    )
    parser.add_argument("--template", required=True, help="llama3, llama2, vicuna_v1.1, alpaca, chatml or tokenizer")
    parser.add_argument("--model", default="tiny", help="model name, directory or hub id whose tokenizer to use")
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per record: text, trained_text, input_ids, tokens and trained (1 per trained token)",
    )
    parser.add_argument("--limit", type=_count, default=None, metavar="N", help="render only the first N records")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more; got {text!r}")
    return int(text)


def _render(args: argparse.Namespace) -> int:
    """Print each conversation as the template renders it, or (``--json``) its text, trained text, token ids, tokens
    and which of them are trained."""
    from data_formats import DataFormatError

    from .data import load_conversations
    from .templates import (
        IGNORE_INDEX,
        TemplateError,
        get_template,
        render,
        stop_token_ids,
        template_class,
        trained_text,
    )

    template_class(args.template)  # an unknown name fails before anything is loaded
    # With --limit only the first N records are read, so a large file's later records are not checked.
    conversations = load_conversations(args.data, limit=args.limit)
    tokenizer = _load_tokenizer(args.model)
    template = get_template(args.template, tokenizer)
    stop_token_ids(template, tokenizer)  # a template this tokenizer cannot express fails here, not on a record
    for conv in conversations:
        try:
            input_ids, labels = render(template, conv.messages, tokenizer)
        except (TemplateError, DataFormatError) as error:  # a record this template cannot render: say which
            raise UserError(f"{conv.origin}: {error}") from None
        text = template.text(conv.messages)
        trained = sum(label != IGNORE_INDEX for label in labels)
        if args.json:
            record = {
                "origin": conv.origin,
                "text": text,
                "trained_text": trained_text(input_ids, labels, tokenizer),
                "num_tokens": len(input_ids),
                "num_trained_tokens": trained,
                "input_ids": input_ids,
                "tokens": tokenizer.convert_ids_to_tokens(input_ids),
                "trained": [int(label != IGNORE_INDEX) for label in labels],
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(f"==> {conv.origin}: {len(input_ids)} tokens, {trained} trained <==")
            print(text)
    return 0


def _load_tokenizer(model: str):
    from .models import load_tokenizer

    try:
        return load_tokenizer(model)
    except (OSError, ValueError) as error:  # transformers raises either for a path or id it cannot load
        raise UserError(f"cannot load a tokenizer from {model!r}: {error}") from error


# ---------------------------------------------------------------------------------------------------------- convert


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    from data_formats.cli import add_skip_arguments

    parser.add_argument(
        "input", help="a .jsonl/.json/.parquet/.csv file, a save_to_disk directory, a hub dataset id or bundled:FILE"
    )
    parser.add_argument("output", help="the .jsonl file to write")
    parser.add_argument("--to", required=True, help="output format: messages, sharegpt, alpaca, preference or unpaired")
    parser.add_argument("--from", dest="from_format", default="auto", help="input format (default: auto-detect)")
    parser.add_argument("--split", default=None, help="split of a DatasetDict directory or hub dataset (default train)")
    parser.add_argument("--limit", type=_count, default=None, metavar="N", help="convert only the first N records")
    add_skip_arguments(parser)


def _convert(args: argparse.Namespace) -> int:
    """Rewrite a data file in another format through ``data_formats.convert`` (streamed; torch is not imported)."""
    import data_formats
    from data_formats.cli import report_conversion

    from .data import resolve_source

    report = data_formats.LoadReport()
    count = data_formats.convert(
        resolve_source(args.input),
        args.output,
        args.to,
        from_format=args.from_format,
        split=args.split,
        limit=args.limit,
        skip_invalid=args.skip_invalid,
        report=report,
    )
    report_conversion(count, args.to, args.output, report, args.skip_invalid, args.rejects)
    return 0


# ----------------------------------------------------------------------------------------------------------- export


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    from .export import add_arguments

    add_arguments(parser)


def _export(args: argparse.Namespace) -> int:
    """Export a run as a PEFT adapter, merged safetensors, a GGUF for llama.cpp or an Ollama model."""
    from .export import run

    return run(args)


# ------------------------------------------------------------------------------------------------------------- chat


def _chat_arguments(parser: argparse.ArgumentParser) -> None:
    from .chat import add_arguments

    add_arguments(parser)


def _chat(args: argparse.Namespace) -> int:
    """Chat with a run or model in the terminal, with its template and stop tokens."""
    from .chat import run

    return run(args)


# ------------------------------------------------------------------------------------------- eval, serve, push


def _module_command(name: str, help: str, module: str) -> Command:
    """A command whose ``add_arguments`` and ``run`` live in ``finetune.MODULE``, imported only when it is chosen."""
    import importlib

    def load():
        return importlib.import_module(f"finetune.{module}")

    return Command(name, help, lambda parser: load().add_arguments(parser), lambda args: load().run(args))


# ---------------------------------------------------------------------------------------------------------- stages


def _stage_arguments(parser: argparse.ArgumentParser) -> None:
    """Nothing: :func:`main` hands everything after a stage's name to the stage, which parses its own options (YAML
    keys as ``--section.key=value``, ``--help`` included); argparse would take ``--help`` and ``--config`` itself."""


def _stage_command(name: str) -> Command:
    from .launch import STAGES, run_stage

    return Command(name, STAGES[name][2], _stage_arguments, lambda args: run_stage(name, []))


def _stage_commands() -> list[Command]:
    from .launch import STAGES

    return [_stage_command(name) for name in STAGES]


COMMANDS: list[Command] = [
    *_stage_commands(),
    Command(
        "render",
        "show how a chat template renders a data file, and which tokens are trained",
        _render_arguments,
        _render,
    ),
    Command("convert", "convert a data file to JSON Lines in another format", _convert_arguments, _convert),
    Command("export", "export a run as adapter, merged safetensors, GGUF or Ollama", _export_arguments, _export),
    Command("chat", "chat with a run or model using its template and stop tokens", _chat_arguments, _chat),
    _module_command("eval", "lm-evaluation-harness tasks, the verifier suite and held-out loss on a run",
                    "eval_command"),
    _module_command("serve", "an OpenAI-compatible chat-completions server for a run or export", "serve"),
    _module_command("push", "upload a run or export, with its model card, to a hub model repository", "hub"),
]
"""The subcommands, in the order ``finetune --help`` lists them."""


def build_parser(commands: list[Command] = COMMANDS, chosen: str | None = None) -> argparse.ArgumentParser:
    """The argument parser with one subparser per command; the chosen command lands in ``args.command``.

    Args:
        commands: The subcommands.
        chosen: The command the arguments name: only its arguments are added, because adding some (``export``,
            ``chat``) imports torch, which ``convert`` and ``render`` should not pay for; ``""`` (no command
            named, as in ``finetune --help``, which lists the commands, not their arguments) adds none; ``None``
            adds every command's.
    """
    parser = argparse.ArgumentParser(prog="finetune", description="Fine-tune LLaMA models: train, data, templates, export.")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for command in commands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        if chosen is None or command.name == chosen:
            command.add_arguments(sub)
        sub.set_defaults(command=command)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the input is wrong rather than the code: reported in one line, exit status 2."""
    from data_formats import DataFormatError

    from .templates import TemplateError

    # DataFormatError also covers conversations whose roles break the rules.
    return (UserError, DataFormatError, TemplateError, OSError)


def main(argv: list[str] | None = None) -> int:
    """Run ``finetune ARGV``; returns the exit status (0 ok, 2 user error; argparse's own status for bad usage)."""
    from .launch import STAGES, run_stage

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in STAGES:
        return run_stage(argv[0], argv[1:])
    names = {command.name for command in COMMANDS}
    parser = build_parser(chosen=argv[0] if argv and argv[0] in names else "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error argparse has already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_USER_ERROR
    try:
        return args.command.run(args)
    except _user_errors() as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
