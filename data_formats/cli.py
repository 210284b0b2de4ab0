"""``python -m data_formats convert IN OUT --to FORMAT``: the converter behind ``finetune convert``."""

from __future__ import annotations

import argparse
import sys

from .canonical import DataFormatError, PreferencePair, unpair
from .loading import iter_records
from .readers import CONVERSATION_FORMATS, FORMATS, PREFERENCE_FORMATS, UNPAIRED_FORMATS
from .report import LoadReport, write_rejects
from .writers import WRITERS, write


def convert(
    in_path,
    out_path,
    to: str,
    from_format: str = "auto",
    split: str | None = None,
    *,
    limit: int | None = None,
    skip_invalid: bool = False,
    report: LoadReport | None = None,
) -> int:
    """Read any supported source and write it as JSON Lines in another format, one record at a time.

    Args:
        in_path: Anything :func:`data_formats.load_conversations` accepts.
        out_path: The JSON Lines file to write (atomically).
        to: ``"messages"``, ``"sharegpt"``, ``"alpaca"``, ``"preference"`` or ``"unpaired"``; preference output
            needs preference input, unpaired output unpaired or preference input (each pair becomes its chosen
            reply, ``label: true``, then its rejected reply, ``label: false``), the others conversation input.
        from_format: The input format, or ``"auto"`` to detect it from the first record.
        split: Split of a ``DatasetDict`` directory or hub dataset.
        limit: Convert only the first N accepted records.
        skip_invalid: Skip malformed records, counting them in ``report``, instead of stopping at the first.
        report: Filled in with what was read, changed and skipped.

    Returns:
        The number of records written.

    Raises:
        DataFormatError: On any problem with the input, the output format or the output path.
    """
    if to not in WRITERS:
        raise DataFormatError(str(out_path), None, None, "--to to be one of " + ", ".join(WRITERS), repr(to))
    if to == "preference":
        hint = "preference output needs preference input; convert conversations with --to messages, sharegpt or alpaca"
        formats = PREFERENCE_FORMATS
    elif to == "unpaired":
        hint = "unpaired output needs unpaired or preference input"
        formats = UNPAIRED_FORMATS + PREFERENCE_FORMATS
    else:
        hint = "convert preference data with --to preference"
        formats = CONVERSATION_FORMATS
    records = iter_records(in_path, from_format, split, formats, hint, limit, skip_invalid, report)
    if to == "unpaired":
        records = (example for record in records
                   for example in (unpair(record) if isinstance(record, PreferencePair) else (record,)))
    return write(records, out_path, to=to)


def rejects_path(out_path) -> str:
    """Where ``convert --skip-invalid`` lists the skipped records: beside the output, ``OUT.rejects.jsonl``."""
    return f"{out_path}.rejects.jsonl"


def add_skip_arguments(parser: argparse.ArgumentParser) -> None:
    """``--skip-invalid`` and ``--rejects``, shared with ``finetune convert``."""
    parser.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed records (counted per reason) instead of stopping at the first",
    )
    parser.add_argument(
        "--rejects", default=None, metavar="FILE", help="with --skip-invalid: list of skipped records (default OUT.rejects.jsonl)"
    )


def report_conversion(count: int, to: str, out_path, report: LoadReport, skip_invalid: bool, rejects) -> None:
    """Print what was written, changed and skipped, and write the rejects file when records were skipped."""
    print(f"wrote {count} {to} records to {out_path}")
    if report.changes or report.skipped:
        print(report.describe("read"))
    if skip_invalid and report.rejects:
        path = rejects or rejects_path(out_path)
        write_rejects(path, [report])
        print(f"skipped records listed in {path}")


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
    add_skip_arguments(conv)
    args = parser.parse_args(argv)
    report = LoadReport()
    try:
        count = convert(
            args.input, args.output, args.to, args.from_format, args.split, skip_invalid=args.skip_invalid, report=report
        )
        report_conversion(count, args.to, args.output, report, args.skip_invalid, args.rejects)
    except DataFormatError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0
