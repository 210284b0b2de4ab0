"""Where records come from: local files, ``save_to_disk`` directories, hub dataset ids, or lists in memory.

Every source becomes a :class:`Source` that yields ``(record, position)`` pairs, where position is the 1-based line
number for JSON Lines and the 0-based index otherwise. Files are streamed: a JSON Lines line, an element of a JSON
list, a CSV row or a parquet batch at a time, never the whole file. Problems with the source itself (missing, not a
regular file, unreadable, not parseable, empty) are raised here as :class:`DataFormatError`; a record that cannot
be parsed but whose end is known (a bad JSON Lines line, a duplicate key, a JSON file cut off inside its last
record) is yielded as its ``DataFormatError`` in place of the record, so that a load with ``skip_invalid`` can go
on. Checking the records is the readers' job.

``datasets`` and ``pyarrow`` are imported inside the functions that need them, so that ``import data_formats``
stays light and local JSON data can be read without them.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .canonical import DataFormatError, Found, Where
from .values import MAX_DEPTH, MAX_RECORD_BYTES

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


def _open_regular(path: Path, name: str, mode: str = "rb", **kwargs):
    """Open a regular file; a FIFO, device or socket is refused before it is opened (opening a FIFO blocks)."""
    try:
        info = path.stat()
    except OSError as e:
        raise DataFormatError(name, None, None, "a readable file", Found(e.strerror or str(e))) from None
    if not stat.S_ISREG(info.st_mode):
        raise DataFormatError(name, None, None, "a regular file", Found(_special_kind(info.st_mode)))
    try:
        return open(path, mode, **kwargs)
    except PermissionError:
        raise DataFormatError(name, None, None, "a readable file", Found("permission denied")) from None
    except OSError as e:
        raise DataFormatError(name, None, None, "a readable file", Found(e.strerror or str(e))) from None


def _special_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "a special file"


def _read_error(name: str, e: OSError) -> DataFormatError:
    return DataFormatError(name, None, None, "a readable file", Found(e.strerror or str(e)))


class _DuplicateKeys:
    """``object_pairs_hook`` that builds dicts like json does and remembers the first key seen twice in an object.

    It does not raise, so the decoder still finds where the record ends and the reader can go on to the next one.
    """

    def __init__(self):
        self.first: str | None = None

    def __call__(self, pairs):
        record = dict(pairs)
        if len(record) != len(pairs) and self.first is None:
            seen = set()
            for key, _ in pairs:
                if key in seen:
                    self.first = key
                    break
                seen.add(key)
        return record

    def take(self) -> str | None:
        first, self.first = self.first, None
        return first


def _duplicate_error(name: str, record: int, key: str, unit: str) -> DataFormatError:
    return DataFormatError(
        name, record, key, "each key once per object", Found(f"{key!r} more than once (JSON keeps only the last)"),
        unit=unit,
    )


def _too_deep(name: str, record: int | None, unit: str) -> DataFormatError:
    return DataFormatError(
        name, record, None, f"lists and objects nested at most {MAX_DEPTH} deep", Found("deeper nesting"), unit=unit
    )


def _jsonl(path: Path, name: str) -> Iterator[tuple[object, int]]:
    """Stream JSON Lines: one line in memory at a time. A bad line is yielded as its error, so a load that skips
    invalid records goes on with the next line."""
    duplicates = _DuplicateKeys()
    decoder = json.JSONDecoder(object_pairs_hook=duplicates)
    seen_bytes = False
    any_record = False
    with _open_regular(path, name) as f:
        lineno = 0
        while True:
            try:
                raw = f.readline(MAX_RECORD_BYTES + 1)
            except OSError as e:
                raise _read_error(name, e) from None
            if not raw:
                break
            lineno += 1
            seen_bytes = True
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):  # skip the rest of the oversized line
                    raw = f.readline(1 << 20)
                any_record = True
                yield DataFormatError(
                    name, lineno, None, f"a line of at most {MAX_RECORD_BYTES} bytes", Found("a longer line"),
                    unit="line",
                ), lineno
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte order mark, as some Windows tools write
            if not raw.strip():
                continue
            any_record = True
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield DataFormatError(
                    name, lineno, None, "UTF-8 text", Found(f"an undecodable byte at column {e.start + 1}"), unit="line"
                ), lineno
                continue
            try:
                record, end = decoder.raw_decode(line.strip(" \t\r\n"))
                if end != len(line.strip(" \t\r\n")):
                    raise json.JSONDecodeError("Extra data", line, end)
            except json.JSONDecodeError as e:
                duplicates.take()
                yield DataFormatError(
                    name,
                    lineno,
                    None,
                    "one valid JSON object per line (JSON Lines)",
                    Found(f"invalid JSON: {e.msg} at column {e.colno}"),
                    unit="line",
                ), lineno
                continue
            except RecursionError:
                duplicates.take()
                yield _too_deep(name, lineno, "line"), lineno
                continue
            key = duplicates.take()
            if key is not None:
                yield _duplicate_error(name, lineno, key, "line"), lineno
                continue
            yield record, lineno
    if not any_record:
        got = Found("only blank lines" if seen_bytes else "an empty file")
        raise DataFormatError(name, None, None, "at least one JSON record (JSON Lines: one object per line)", got)


# Keys under which a one-key object is itself a record, not a wrapper around the list of records.
_RECORD_KEYS = ("conversations", "messages", "chosen", "rejected", "prompt")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_CHUNK = 1 << 20


class _JsonStream:
    """A JSON document read in chunks: a text buffer, a position in it, and line numbers for errors.

    Only the unconsumed tail of the buffer is kept, so a list of records is read with one record (plus a chunk) in
    memory rather than the whole file.
    """

    def __init__(self, f, name: str):
        self.f = f
        self.name = name
        self.decoder_bytes = codecs.getincrementaldecoder("utf-8-sig")()
        self.bytes_read = 0
        self.buf = ""
        self.pos = 0
        self.line = 1  # line number of buf[0]
        self.eof = False
        self.anchor: int | None = None  # a position fill() must keep, to step back to
        self.truncated = False

    def fill(self) -> bool:
        """Read more (at least as much again as the unconsumed text, so a huge record is read in O(n log n));
        return whether anything was added."""
        if self.eof:
            return False
        cut = self.pos if self.anchor is None else min(self.pos, self.anchor)
        self.line += self.buf.count("\n", 0, cut)
        self.buf = self.buf[cut:]
        self.pos -= cut
        if self.anchor is not None:
            self.anchor -= cut
        want = max(_CHUNK, len(self.buf))
        try:
            data = self.f.read(want)
        except OSError as e:
            raise _read_error(self.name, e) from None
        pending = len(self.decoder_bytes.getstate()[0])
        try:
            text = self.decoder_bytes.decode(data, final=not data)
        except UnicodeDecodeError as e:
            offset = self.bytes_read - pending + e.start
            raise DataFormatError(
                self.name, None, None, "UTF-8 text", Found(f"an undecodable byte at offset {offset}")
            ) from None
        self.bytes_read += len(data)
        if not data:
            self.eof = True
        self.buf += text
        return bool(text) or not self.eof

    def skip_whitespace(self) -> str:
        """Skip whitespace; return the next character, or ``""`` at the end of the file."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.fill():
                return ""

    def location(self, pos: int) -> str:
        line = self.line + self.buf.count("\n", 0, pos)
        column = pos - self.buf.rfind("\n", 0, pos)
        return f"line {line} column {column}"

    def invalid(self, message: str, pos: int, hint: str | None = None) -> DataFormatError:
        return DataFormatError(
            self.name,
            None,
            None,
            "valid JSON (a list of records)",
            Found(f"invalid JSON: {message} at {self.location(pos)}"),
            hint=hint,
        )

    def value(self, decoder: json.JSONDecoder, index: int | None):
        """Decode the JSON value at the position, reading more until it is complete.

        Returns:
            The value, or ``None`` with :attr:`truncated` set when the file ends inside it.
        """
        self.truncated = False
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                # The value may only be cut off by the end of the buffer: read on before calling it invalid.
                if not self.eof and (e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 16):
                    self._grow(index)
                    continue
                if self.eof and _cut_off(e, self.buf):
                    self.truncated = True
                    return None
                raise self.invalid(e.msg, e.pos) from None
            except RecursionError:
                raise _too_deep(self.name, index, "record") from None
            if end == len(self.buf) and not self.eof:
                self._grow(index)  # a number at the end of the buffer may go on in the next chunk
                continue
            self.pos = end
            return value

    def _grow(self, index: int | None) -> None:
        if len(self.buf) - self.pos > MAX_RECORD_BYTES:
            raise DataFormatError(
                self.name, index, None, f"records of at most {MAX_RECORD_BYTES} bytes", Found("a longer record")
            )
        self.fill()


_PARTIAL_TOKEN = re.compile(r"[\w.+-]{0,16}")


def _cut_off(e: json.JSONDecodeError, text: str) -> bool:
    """Whether a decode error at the end of the file is the file ending inside the value (not a wrong character)."""
    if e.msg.startswith("Unterminated string"):
        return True
    # Nothing after the error but the start of a literal or number (``tru``, ``12e``): the text stops there.
    return _PARTIAL_TOKEN.fullmatch(text, e.pos) is not None


def _kind(value) -> str:
    if isinstance(value, dict):
        return "an object with keys " + ", ".join(list(value)[:8]) if value else "an empty object"
    return f"a JSON {type(value).__name__}"


def _json(path: Path, name: str) -> Iterator[tuple[object, int]]:
    """Stream a JSON list of records (or an object holding one such list) one record at a time."""
    duplicates = _DuplicateKeys()
    decoder = json.JSONDecoder(object_pairs_hook=duplicates)
    with _open_regular(path, name) as f:
        stream = _JsonStream(f, name)
        first = stream.skip_whitespace()
        if not first:
            raise DataFormatError(name, None, None, "a JSON list of records", Found("an empty file"))
        wrapped = False
        if first == "{":
            wrapped = _enter_wrapper(stream, decoder, duplicates)
        elif first != "[":
            value = stream.value(decoder, None)
            if stream.truncated:
                raise stream.invalid("Expecting value", stream.pos)
            raise DataFormatError(
                name, None, None, "a JSON list of records, or an object holding one list of records", Found(_kind(value))
            )
        stream.pos += 1  # the "["
        index = 0
        if stream.skip_whitespace() == "]":
            raise DataFormatError(name, None, None, "at least one record", Found("an empty list"))
        while True:
            start = stream.pos
            record = stream.value(decoder, index)
            if stream.truncated:
                duplicates.take()
                yield DataFormatError(
                    name, index, None, "a complete JSON record", Found(f"the file ending inside it ({stream.location(start)}; truncated?)")
                ), index
                return
            key = duplicates.take()
            yield (_duplicate_error(name, index, key, "record") if key is not None else record), index
            index += 1
            following = stream.skip_whitespace()
            if following == ",":
                stream.pos += 1
                stream.skip_whitespace()
                continue
            if following == "]":
                stream.pos += 1
                break
            if not following:
                yield DataFormatError(
                    name, index, None, "a complete JSON list", Found("the file ending before its closing ']' (truncated?)")
                ), index
                return
            raise stream.invalid("Expecting ',' delimiter", stream.pos)
        if wrapped:
            if stream.skip_whitespace() != "}":
                raise DataFormatError(
                    name, None, None, "an object holding one list of records",
                    Found("an object with more keys after the list"),
                )
            stream.pos += 1
        if stream.skip_whitespace():
            text = stream.buf[stream.pos : stream.pos + 1]
            hint = "this looks like JSON Lines (one object per line): name the file .jsonl" if text == "{" else None
            raise stream.invalid("Extra data", stream.pos, hint=hint)


def _enter_wrapper(stream: _JsonStream, decoder: json.JSONDecoder, duplicates: _DuplicateKeys) -> bool:
    """``{"data": [...]}``: step into the one key's list (leaving the position on its ``[``) and return True; any
    other object is refused, with the JSON Lines hint when it is followed by more objects."""
    name = stream.name
    stream.anchor = stream.pos
    stream.pos += 1
    if stream.skip_whitespace() == '"':
        key = stream.value(decoder, None)
        if not stream.truncated and stream.skip_whitespace() == ":":
            stream.pos += 1
            if stream.skip_whitespace() == "[" and key not in _RECORD_KEYS:
                stream.anchor = None
                return True
    # Not a wrapper: read the whole object (one value, so it is bounded by the record limit) to say what it is.
    start, stream.pos, stream.anchor = stream.anchor, stream.anchor, None
    value = stream.value(decoder, None)
    duplicates.take()
    if stream.truncated:
        raise stream.invalid("Unterminated object", start)
    if stream.skip_whitespace() == "{":
        raise stream.invalid(
            "Extra data", stream.pos, hint="this looks like JSON Lines (one object per line): name the file .jsonl"
        )
    raise DataFormatError(
        name, None, None, "a JSON list of records, or an object holding one list of records", Found(_kind(value))
    )


def _parquet(path: Path, name: str) -> Iterator[tuple[object, int]]:
    import pyarrow
    import pyarrow.parquet as pq

    f = _open_regular(path, name)
    with f:
        try:
            parquet = pq.ParquetFile(f)
        except (pyarrow.ArrowException, OSError) as e:
            raise _bad_parquet(name, None, e) from None
        if parquet.metadata.num_rows == 0:
            raise DataFormatError(name, None, None, "at least one record", Found("a parquet file with no rows"))
        index = 0
        batches = parquet.iter_batches(batch_size=1024)
        while True:
            try:
                batch = next(batches, None)
                records = batch.to_pylist() if batch is not None else None
            except (pyarrow.ArrowException, OSError) as e:
                raise _bad_parquet(name, index, e) from None
            if records is None:
                break
            for record in records:
                yield record, index
                index += 1


def _bad_parquet(name: str, index: int | None, e: Exception) -> DataFormatError:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return DataFormatError(name, index, None, "a valid parquet file", Found(first))


def _csv(path: Path, name: str) -> Source:
    f = _open_regular(path, name, "r", encoding="utf-8-sig", newline="")
    # Conversations easily outgrow csv's default 128 KiB cell limit; the record limit bounds a cell instead.
    csv.field_size_limit(MAX_RECORD_BYTES)
    rows = csv.reader(f)
    try:
        header = next((row for row in rows if row), None)
    except csv.Error as e:
        f.close()
        raise DataFormatError(name, None, None, "a CSV header row", Found(f"invalid CSV: {e}")) from None
    except UnicodeDecodeError as e:
        f.close()
        raise DataFormatError(name, None, None, "UTF-8 text", Found(f"an undecodable byte ({e.reason})")) from None
    if header is None:
        f.close()
        raise DataFormatError(name, None, None, "a CSV header row and at least one record", Found("an empty file"))
    repeated = next((column for i, column in enumerate(header) if column in header[:i]), None)
    if repeated is not None:
        f.close()
        raise DataFormatError(name, None, repeated, "each column name once in the header", Found(f"{repeated!r} twice"))
    return Source(name, "record", _closing(f, _csv_rows(rows, header, name)), columns=header)


def _closing(f, records: Iterator[tuple[object, int]]) -> Iterator[tuple[object, int]]:
    with f:
        yield from records


def _csv_rows(rows, header: list[str], name: str) -> Iterator[tuple[object, int]]:
    index = 0
    while True:
        try:
            row = next(rows, None)
        except csv.Error as e:
            raise DataFormatError(name, index, None, "a valid CSV row", Found(f"invalid CSV: {e}")) from None
        except UnicodeDecodeError as e:
            raise DataFormatError(name, index, None, "UTF-8 text", Found(f"an undecodable byte ({e.reason})")) from None
        if row is None:
            break
        if not row:
            continue  # blank line
        if len(row) != len(header):
            yield DataFormatError(
                name, index, None, f"{len(header)} cells, one per header column", Found(f"{len(row)} cells")
            ), index
            index += 1
            continue
        record = dict(zip(header, row, strict=True))
        for key in CSV_LIST_COLUMNS:
            if key in record and record[key].lstrip().startswith("["):
                try:
                    record[key] = json.loads(record[key])
                except json.JSONDecodeError as e:
                    record = DataFormatError(
                        name, index, key, "a JSON list of messages in the cell", Found(f"invalid JSON: {e.msg}")
                    )
                    break
                except RecursionError:
                    record = _too_deep(name, index, "record")
                    break
        for key in CSV_MAYBE_LIST_COLUMNS if isinstance(record, dict) else ():
            # A prompt may legitimately start with "[", so only a parsed list of objects counts as messages.
            if key in record and record[key].lstrip().startswith("["):
                try:
                    parsed = json.loads(record[key])
                except (json.JSONDecodeError, RecursionError):
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
