"""Reading source rows: the GLUE-style text files, CSV, JSON Lines and Parquet.

Every reader turns a file into :class:`RawRow` s -- values not yet checked, each with the file
and physical line it came from -- and reports a malformed row through :class:`RowProblems`,
which raises on the first (naming file and line) or, with ``skip_bad_rows``, counts it and
keeps where it was. Validation of the values themselves is :func:`pipeline.prepare.splits.normalise`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from pipeline.errors import InputError


SPLITS = ("train", "dev")
#: How many bad-row locations the manifest keeps when ``skip_bad_rows`` is on.
MAX_REPORTED_PROBLEMS = 100



@dataclass
class RawRow:
    """One source row before validation of its values."""

    index: int          # 0-based data-row index within its split (becomes the id)
    path: str           # file (or dataset) named in error messages
    line: int           # 1-based physical line (text files) or row number
    text_a: Any
    text_b: Any
    label: Any


class RowProblems:
    """Raises on the first bad row, or (``skip``) counts bad rows and keeps where they were."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.found: list[tuple[int, int, str]] = []  # (split order, line, "file:line: problem")
        self.count = {split: 0 for split in SPLITS}

    def report(self, split: str, path: str, line: int | None, problem: str) -> None:
        if not self.skip:
            raise InputError(problem, path, line)
        self.count[split] += 1
        self.found.append((SPLITS.index(split), line or 0, str(InputError(problem, path, line))))

    def summary(self) -> dict:
        """Counts per split and the first :data:`MAX_REPORTED_PROBLEMS` locations, in file order."""
        # Rows are checked in two passes (layout while reading, values afterwards): sort.
        ordered = [text for _, _, text in sorted(self.found, key=lambda item: item[:2])]
        return {"count": len(ordered), "by_split": dict(self.count),
                "rows": ordered[:MAX_REPORTED_PROBLEMS], "capped": len(ordered) > MAX_REPORTED_PROBLEMS}


# --------------------------------------------------------------------------------------------
# Text files: tab-separated without quoting (GLUE), CSV, JSON Lines
# --------------------------------------------------------------------------------------------

def _decoded_lines(path: Path, split: str, problems: RowProblems) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` per physical line, strictly decoded as UTF-8.

    A leading byte-order mark is dropped, ``\\r\\n`` endings are accepted and blank lines at
    the end of the file are ignored. A line that is not valid UTF-8 is a bad row.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    while lines and not lines[-1].strip(b"\r"):
        lines.pop()
    for number, raw in enumerate(lines, start=1):
        raw = raw.removesuffix(b"\r")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.report(split, str(path), number, f"invalid UTF-8 (byte {exc.start} of the line: "
                                                      f"{raw[exc.start:exc.start + 4]!r})")
            continue
        yield number, text


def _column_positions(header: Sequence[str], wanted: Mapping[str, str], path: Path) -> dict[str, int]:
    positions = {}
    for field, column in wanted.items():
        if column not in header:
            raise InputError(f"header has no column {column!r} (for {field}); columns: {list(header)}",
                             path, 1)
        positions[field] = list(header).index(column)
    return positions


def read_delimited(path: Path | str, split: str, columns: Mapping[str, str | int],
                   problems: RowProblems, *, delimiter: str = "\t", quoting: bool = False,
                   has_header: bool = True, num_columns: int | None = None) -> list[RawRow]:
    """Read a delimited text file into :class:`RawRow`s.

    ``columns`` maps ``text_a``/``text_b``/``label`` to header names (or to 0-based indices
    when there is no header). Every row must have as many columns as the header (or
    ``num_columns``). ``quoting=False`` splits each line on the delimiter (GLUE's TSVs);
    ``quoting=True`` uses the csv module's standard double-quote rules (CSV files), where a
    quoted field may span lines: its row is reported at the line where it starts.
    """
    path = Path(path)
    numbered = _decoded_lines(path, split, problems)
    if quoting:
        records = _quoted_records(numbered, delimiter, path)
    else:
        records = ((number, text.split(delimiter)) for number, text in numbered)
    rows: list[RawRow] = []
    positions: dict[str, int] | None = None
    if not has_header:
        positions = {field: int(col) for field, col in columns.items()}
    data_index = 0
    seen_a_row = False
    for number, fields in records:
        if positions is None:  # the header line
            if number != 1:
                raise InputError("the header line is not valid UTF-8", path, 1)
            header = [f.strip() for f in fields]
            num_columns = len(header)
            positions = _column_positions(header, {k: str(v) for k, v in columns.items()}, path)
            continue
        # Unquoted files have one row per line, so the index follows the line number and stays
        # stable when an undecodable line is skipped; quoted rows may span lines: count them.
        index = data_index if quoting else number - 1 - int(has_header)
        data_index += 1
        if num_columns is None:
            # A headerless file of no fixed layout: its first row says how many columns a
            # row has, and every mapped index must exist in it.
            num_columns = len(fields)
            beyond = {f: c for f, c in positions.items() if c >= num_columns}
            if beyond:
                raise InputError(f"the column mapping asks for column(s) {beyond} but the first "
                                 f"row has {num_columns} column(s) (indices are 0-based)", path, number)
        seen_a_row = True
        if len(fields) != num_columns:
            problems.report(split, str(path), number,
                            f"expected {num_columns} {'tab' if delimiter == chr(9) else repr(delimiter)}"
                            f"-separated columns, found {len(fields)}")
            continue
        rows.append(RawRow(index, str(path), number, *(
            fields[positions[f]] if f in positions else None for f in ("text_a", "text_b", "label"))))
    if positions is None:
        raise InputError("file is empty (no header line)", path, 1)
    if not has_header and not seen_a_row:
        raise InputError("file is empty (no rows)", path, 1)
    return rows


def _quoted_records(numbered: Iterator[tuple[int, str]], delimiter: str,
                    path: Path) -> Iterator[tuple[int, list[str]]]:
    """Parse CSV records while remembering the physical line each record starts on."""
    current = {"line": 0}

    def lines() -> Iterator[str]:
        for number, text in numbered:
            current["line"] = number
            yield text + "\n"

    source = lines()
    reader = csv.reader(source, delimiter=delimiter, strict=True)
    while True:
        start = current["line"] + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise InputError(f"malformed CSV ({exc})", path, start) from None
        yield start, fields


def read_jsonl(path: Path | str, split: str, columns: Mapping[str, str], problems: RowProblems) -> list[RawRow]:
    """Read JSON Lines (one object per line); a missing key is a missing field."""
    path = Path(path)
    rows: list[RawRow] = []
    for number, text in _decoded_lines(path, split, problems):
        this = number - 1
        if not text.strip():
            problems.report(split, str(path), number, "blank line (expected a JSON object)")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.report(split, str(path), number, f"invalid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.report(split, str(path), number, f"expected a JSON object, got {type(record).__name__}")
            continue
        missing = [f"{field} ({column!r})" for field, column in columns.items() if column not in record]
        if missing:
            problems.report(split, str(path), number, f"missing field {', '.join(missing)}")
            continue
        rows.append(RawRow(this, str(path), number,
                           *(record.get(columns[f]) if f in columns else None
                             for f in ("text_a", "text_b", "label"))))
    return rows


def read_parquet(path: Path | str, split: str, columns: Mapping[str, str]) -> list[RawRow]:
    """Read a Parquet file; line numbers in problems are 1-based row numbers."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise InputError(f"not a readable Parquet file ({exc})", path) from None
    for field, column in columns.items():
        if column not in schema.names:
            raise InputError(f"no column {column!r} (for {field}); columns: {schema.names}", path)
    table = pq.read_table(path, columns=list(dict.fromkeys(columns.values())))
    values = {field: table.column(column).to_pylist() for field, column in columns.items()}
    return [RawRow(i, str(path), i + 1, *(values[f][i] if f in values else None
                                          for f in ("text_a", "text_b", "label")))
            for i in range(table.num_rows)]


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

FILE_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                ".parquet": "parquet", ".pq": "parquet"}


def file_format(path: Path | str, declared: str = "") -> str:
    if declared:
        if declared not in set(FILE_FORMATS.values()):
            raise InputError(f"unknown file format {declared!r}; use one of "
                             f"{sorted(set(FILE_FORMATS.values()))}")
        return declared
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_FORMATS:
        raise InputError(f"cannot tell the format from the extension {suffix!r}; "
                         f"name it (csv, tsv, jsonl, parquet)", path)
    return FILE_FORMATS[suffix]
