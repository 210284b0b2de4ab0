"""``python -m data_formats convert IN OUT --to FORMAT``: the converter behind ``finetune convert``."""

from __future__ import annotations

import argparse
import sys

from .canonical import DataFormatError
from .loading import _load
from .readers import CONVERSATION_FORMATS, FORMATS, PREFERENCE_FORMATS
from .writers import WRITERS, write


def convert(in_path, out_path, to: str, from_format: str = "auto", split: str | None = None) -> int:
    """Read any supported source and write it as JSON Lines in another format.

    Args:
        in_path: Anything :func:`data_formats.load_conversations` accepts.
        out_path: The JSON Lines file to write (atomically).
        to: ``"messages"``, ``"sharegpt"``, ``"alpaca"`` or ``"preference"``; preference output needs preference
            input, the others conversation input.
        from_format: The input format, or ``"auto"`` to detect it from the first record.
        split: Split of a ``DatasetDict`` directory or hub dataset.

    Returns:
        The number of records written.

    Raises:
        DataFormatError: On any problem with the input, the output format or the output path.
    """
    if to not in WRITERS:
        raise DataFormatError(str(out_path), None, None, "--to to be one of " + ", ".join(WRITERS), repr(to))
    if to == "preference":
        hint = "preference output needs preference input; convert conversations with --to messages, sharegpt or alpaca"
        records = _load(in_path, from_format, split, PREFERENCE_FORMATS, hint)
    else:
        hint = "convert preference data with --to preference"
        records = _load(in_path, from_format, split, CONVERSATION_FORMATS, hint)
    return write(records, out_path, to=to)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input, printed as one ``error:`` line)."""
    parser = argparse.ArgumentParser(
        prog="python -m data_formats", description="Convert fine-tuning data between formats."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="convert a data file to JSON Lines in another format")
    conv.add_argument("input", help="a .jsonl/.json/.parquet/.csv file, a save_to_disk directory or a hub dataset id")
    conv.add_argument("output", help="the .jsonl file to write")
    conv.add_argument("--to", required=True, choices=list(WRITERS), help="output format")
    conv.add_argument(
        "--from", dest="from_format", default="auto", choices=["auto", *FORMATS], help="input format (default: auto)"
    )
    conv.add_argument("--split", default=None, help="split of a DatasetDict directory or hub dataset (default train)")
    args = parser.parse_args(argv)
    try:
        count = convert(args.input, args.output, args.to, args.from_format, args.split)
    except DataFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {count} {args.to} records to {args.output}")
    return 0
