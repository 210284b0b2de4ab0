"""Where records come from: local files, ``save_to_disk`` directories, hub dataset ids, or lists in memory.

Every source becomes a :class:`Source` that yields ``(record, position)`` pairs, where position is the 1-based line
number for JSON Lines and the 0-based index otherwise. Problems with the source itself (missing, unreadable, not
parseable, empty) are raised here as :class:`DataFormatError`; checking the records is the readers' job.

``datasets`` and ``pyarrow`` are imported inside the functions that need them, so that ``import data_formats``
stays light and local JSON data can be read without them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .canonical import DataFormatError, Found, Where

JSONL_SUFFIXES = (".jsonl", ".ndjson")
SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".csv")
SUPPORTED = "a .jsonl, .json, .parquet or .csv file, a directory written by datasets' save_to_disk, or a hub dataset id"
LOCAL_HINT = "local .jsonl, .json, .parquet and .csv files and save_to_disk directories work offline"

# Cells that hold message lists in a CSV; prompt/chosen/rejected may hold either a list or plain text.
CSV_LIST_COLUMNS = ("conversations", "messages")
CSV_MAYBE_LIST_COLUMNS = ("prompt", "chosen", "rejected")

# owner/name, as on the hub: one slash, no leading dot or slash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class Source:
    """An opened source.

    Attributes:
        name: How errors and origins name it: the path as given, ``owner/name:split``, or ``<memory>``.
        unit: ``"line"`` when positions are line numbers, ``"record"`` when they are indices.
        records: Yields ``(record, position)``; raises :class:`DataFormatError` for source-level problems.
        columns: The header of a CSV file (checked against the format's required fields), else ``None``.
    """

    name: str
    unit: str
    records: Iterator[tuple[object, int]]
    columns: list[str] | None = field(default=None)

    def where(self, position: int | None) -> Where:
        """The :class:`Where` of a record of this source."""
        return Where(self.name, position, self.unit)


def looks_like_hub_id(text: str) -> bool:
    """``owner/name`` that is not a data file name (``data/train.jsonl`` is a missing file, not a dataset)."""
    return bool(_HUB_ID.match(text)) and not text.lower().endswith(SUFFIXES)


def open_source(source, split: str | None = None) -> Source:
    """Open any accepted source.

    Args:
        source: A path (str or ``os.PathLike``) to a file or ``save_to_disk`` directory, a hub dataset id
            (``owner/name``, when no such path exists), or a list of dicts already in memory.
        split: The split of a ``DatasetDict`` directory or hub dataset (default ``"train"``). Single-split
            sources accept only ``None`` or ``"train"``, so that asking a plain file for ``"test"`` cannot
            silently return training data.

    Returns:
        The opened :class:`Source`.

    Raises:
        DataFormatError: When the source is missing, unreadable, of an unknown kind, unparseable or empty.
    """
    if isinstance(source, list | tuple):
        _single_split("<memory>", split)
        return Source("<memory>", "record", _memory(source))
    if not isinstance(source, str | os.PathLike):
        raise DataFormatError(str(source), None, None, SUPPORTED + ", or a list of records", describe_type(source))
    name = os.fspath(source)
    path = Path(name)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _dataset_dir(path, name, split)
        raise DataFormatError(
            name, None, None, SUPPORTED, Found("a directory without dataset_dict.json or state.json (not save_to_disk)")
        )
    if path.exists():
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            got = Found(f"a '{path.suffix}' file" if path.suffix else "a file without an extension")
            raise DataFormatError(name, None, None, SUPPORTED, got)
        _single_split(name, split)
        if suffix in JSONL_SUFFIXES:
            return Source(name, "line", _jsonl(path, name))
        if suffix == ".json":
            return Source(name, "record", _json(path, name))
        if suffix == ".parquet":
            return Source(name, "record", _parquet(path, name))
        return _csv(path, name)
    if isinstance(source, str) and looks_like_hub_id(source):
        return _hub(source, split)
    raise DataFormatError(
        name, None, None, "an existing file or directory, or a hub dataset id (owner/name)", Found("no such path")
    )


def describe_type(value) -> Found:
    return Found(f"a {type(value).__name__}")


def _single_split(name: str, split: str | None) -> None:
    if split not in (None, "train"):
        raise DataFormatError(
            name,
            None,
            None,
            "no split other than 'train' (splits select from save_to_disk DatasetDict directories and hub datasets)",
            repr(split),
        )


def _memory(records) -> Iterator[tuple[object, int]]:
    if not records:
        raise DataFormatError("<memory>", None, None, "at least one record", Found("an empty list"))
    yield from ((record, i) for i, record in enumerate(records))


def _read_bytes(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes()
    except PermissionError:
        raise DataFormatError(name, None, None, "a readable file", Found("permission denied")) from None
    except OSError as e:
        raise DataFormatError(name, None, None, "a readable file", Found(e.strerror or str(e))) from None


def _read_text(path: Path, name: str) -> str:
    try:
        return _read_bytes(path, name).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(
            name, None, None, "UTF-8 text", Found(f"an undecodable byte at offset {e.start}")
        ) from None


def _jsonl(path: Path, name: str) -> Iterator[tuple[object, int]]:
    data = _read_bytes(path, name)
    if not data.strip():
        got = Found("an empty file" if not data else "only blank lines")
        raise DataFormatError(name, None, None, "at least one JSON record (JSON Lines: one object per line)", got)
    # Decoded line by line so that a bad byte is reported on its own line.
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # UTF-8 byte order mark, as some Windows tools write
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataFormatError(
                name, lineno, None, "UTF-8 text", Found(f"an undecodable byte at column {e.start + 1}"), unit="line"
            ) from None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                name,
                lineno,
                None,
                "one valid JSON object per line (JSON Lines)",
                Found(f"invalid JSON: {e.msg} at column {e.colno}"),
                unit="line",
            ) from None
        yield record, lineno


def _json(path: Path, name: str) -> Iterator[tuple[object, int]]:
    text = _read_text(path, name)
    if not text.strip():
        raise DataFormatError(name, None, None, "a JSON list of records", Found("an empty file"))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        hint = None
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            hint = "this looks like JSON Lines (one object per line): name the file .jsonl"
        raise DataFormatError(
            name,
            None,
            None,
            "valid JSON (a list of records)",
            Found(f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}"),
            hint=hint,
        ) from None
    # {"data": [...]}: a single list under one key, as some exports wrap their records.
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        key = next(iter(value))
        if key not in ("conversations", "messages", "chosen", "rejected", "prompt"):
            value = value[key]
    if not isinstance(value, list):
        raise DataFormatError(
            name, None, None, "a JSON list of records, or an object holding one list of records", Found(_kind(value))
        )
    if not value:
        raise DataFormatError(name, None, None, "at least one record", Found("an empty list"))
    yield from ((record, i) for i, record in enumerate(value))


def _kind(value) -> str:
    if isinstance(value, dict):
        return "an object with keys " + ", ".join(list(value)[:8]) if value else "an empty object"
    return f"a JSON {type(value).__name__}"


def _parquet(path: Path, name: str) -> Iterator[tuple[object, int]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except PermissionError:
        raise DataFormatError(name, None, None, "a readable file", Found("permission denied")) from None
    except (pyarrow.ArrowException, OSError) as e:
        raise DataFormatError(name, None, None, "a valid parquet file", Found(str(e).splitlines()[0])) from None
    if parquet.metadata.num_rows == 0:
        raise DataFormatError(name, None, None, "at least one record", Found("a parquet file with no rows"))
    index = 0
    for batch in parquet.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            yield record, index
            index += 1


def _csv(path: Path, name: str) -> Source:
    text = _read_text(path, name)
    # Conversations easily outgrow csv's default 128 KiB cell limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next((row for row in rows if row), None)
    except csv.Error as e:
        raise DataFormatError(name, None, None, "a CSV header row", Found(f"invalid CSV: {e}")) from None
    if header is None:
        raise DataFormatError(name, None, None, "a CSV header row and at least one record", Found("an empty file"))
    return Source(name, "record", _csv_rows(rows, header, name), columns=header)


def _csv_rows(rows, header: list[str], name: str) -> Iterator[tuple[object, int]]:
    index = 0
    while True:
        try:
            row = next(rows, None)
        except csv.Error as e:
            raise DataFormatError(name, index, None, "a valid CSV row", Found(f"invalid CSV: {e}")) from None
        if row is None:
            break
        if not row:
            continue  # blank line
        if len(row) != len(header):
            raise DataFormatError(
                name, index, None, f"{len(header)} cells, one per header column", Found(f"{len(row)} cells")
            )
        record = dict(zip(header, row, strict=True))
        for key in CSV_LIST_COLUMNS:
            if key in record and record[key].lstrip().startswith("["):
                try:
                    record[key] = json.loads(record[key])
                except json.JSONDecodeError as e:
                    raise DataFormatError(
                        name, index, key, "a JSON list of messages in the cell", Found(f"invalid JSON: {e.msg}")
                    ) from None
        for key in CSV_MAYBE_LIST_COLUMNS:
            # A prompt may legitimately start with "[", so only a parsed list of objects counts as messages.
            if key in record and record[key].lstrip().startswith("["):
                try:
                    parsed = json.loads(record[key])
                except json.JSONDecodeError:
                    continue
                if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
                    record[key] = parsed
        yield record, index
        index += 1
    if index == 0:
        raise DataFormatError(name, None, None, "at least one record after the header", Found("a header only"))


def _dataset_dir(path: Path, name: str, split: str | None) -> Source:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:  # any failure here means the directory is not a usable dataset
        raise DataFormatError(
            name, None, None, "a directory written by datasets' save_to_disk", Found(f"{type(e).__name__}: {e}")
        ) from e
    if isinstance(loaded, datasets.DatasetDict):
        split = split or "train"
        if split not in loaded:
            raise DataFormatError(
                name, None, None, "a split named one of " + ", ".join(loaded), repr(split), hint="pass split="
            )
        return Source(f"{name}:{split}", "record", _rows(loaded[split], f"{name}:{split}"))
    _single_split(name, split)
    return Source(name, "record", _rows(loaded, name))


def _rows(dataset, name: str) -> Iterator[tuple[object, int]]:
    if len(dataset) == 0:
        raise DataFormatError(name, None, None, "at least one record", Found("an empty dataset"))
    yield from ((record, i) for i, record in enumerate(dataset))


def _hub(dataset_id: str, split: str | None) -> Source:
    split = split or "train"
    try:
        import datasets

        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id, gated, missing split: all mean "could not fetch"
        raise DataFormatError(
            dataset_id,
            None,
            None,
            "a local path, or a hub dataset id that can be fetched",
            Found(f"no such local path, and the hub dataset could not be fetched ({type(e).__name__}: {e})"),
            hint=LOCAL_HINT,
        ) from e
    name = f"{dataset_id}:{split}"
    return Source(name, "record", _rows(loaded, name))
