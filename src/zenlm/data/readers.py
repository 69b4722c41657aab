"""Input readers: plain text, JSONL, and either one gzipped, with bad-record counting per file.

Formats are chosen by file name: ``.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz``) are
JSON Lines with the document in `text_field`; anything else is UTF-8 text. A text file is either
one document (text_mode="file", the default) or one document per non-empty line ("line").

The record unit is a line in every format. A bad record (non-UTF-8 bytes, invalid JSON, a missing
or non-string field) is skipped and counted per file; when a file's bad fraction exceeds
`max_bad_fraction` the reader raises BadInputError naming the file, after reading it.

`check_inputs(paths)` is the cheap up-front check both tools run before any work: every input
exists, is a readable file, is not empty, a `.gz` is gzip, and the first block is text (no NUL
bytes, not another compression format). A file that fails to decompress later is named too.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zenlm.errors import ZenlmError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_MODES = ("file", "line")
BAD_KINDS = ("non_utf8", "invalid_json", "missing_field")


class BadInputError(ZenlmError, ValueError):
    """Bad input the user can fix: an input file (missing, binary, too many bad records) or a
    command-line value; the message names the file or the flag."""


PROBE_BYTES = 1 << 16
"""How much of each input check_inputs reads (decompressed): enough to tell text from binary."""
GZIP_MAGIC = b"\x1f\x8b"
OTHER_FORMATS = {
    b"\x28\xb5\x2f\xfd": "zstd-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    b"BZh": "bzip2-compressed",
    b"PK\x03\x04": "a zip archive",
    b"\x7fELF": "an executable",
}
"""Leading bytes of formats the readers do not take (only .gz is decompressed)."""


def check_input(path: str | os.PathLike) -> None:
    """Raise BadInputError naming `path` unless it is a readable, non-empty text/JSONL file."""
    p = Path(path)
    if not p.exists():
        raise BadInputError(f"{path}: input file not found")
    if not p.is_file():
        raise BadInputError(f"{path}: input is not a regular file (a directory?); pass files")
    gz = str(path).lower().endswith(".gz")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
        if not head:
            raise BadInputError(f"{path}: input file is empty; remove it from the inputs")
        if gz and not head.startswith(GZIP_MAGIC):
            raise BadInputError(
                f"{path}: named .gz but is not gzip (first bytes {head[:4].hex()}); "
                "rename it without .gz or compress it with gzip"
            )
        if not gz and head.startswith(GZIP_MAGIC):
            raise BadInputError(
                f"{path}: is gzip-compressed but its name does not end in .gz; rename it to "
                f"{p.name}.gz"
            )
        with open_binary(p) as f:
            block = f.read(PROBE_BYTES)
    except BadInputError:
        raise
    except PermissionError as e:
        raise BadInputError(f"{path}: cannot read input ({e.strerror}); fix its permissions") from e
    except (OSError, EOFError, zlib.error) as e:
        raise BadInputError(f"{path}: cannot read input: {_reason(e)}") from e
    if not block:
        raise BadInputError(f"{path}: input holds no data (empty after decompression)")
    for magic, what in OTHER_FORMATS.items():
        if block.startswith(magic):
            raise BadInputError(
                f"{path}: is {what}, not text or JSONL; decompress or convert it first "
                "(only .gz is read)"
            )
    nul = block.find(b"\0")
    if block.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_utf16(block):
        raise BadInputError(f"{path}: is UTF-16 text; convert it to UTF-8 (iconv -f UTF-16)")
    if nul >= 0:
        raise BadInputError(
            f"{path}: binary data, not text or JSONL (NUL byte at offset {nul}); inputs must be "
            "UTF-8 text"
        )


def _looks_utf16(block: bytes) -> bool:
    """Mostly-ASCII UTF-16 without a byte order mark: every other byte of the start is NUL."""
    head = block[:256]
    if len(head) < 16:
        return False
    half = len(head) // 2
    even, odd = head[0::2].count(0), head[1::2].count(0)
    return (odd > 0.9 * half and even < 0.1 * half) or (even > 0.9 * half and odd < 0.1 * half)


def check_inputs(paths: Iterable[str | os.PathLike]) -> None:
    """check_input on every path before any is read; the error names the first bad file (and
    how many more are bad)."""
    paths = list(paths)
    if not paths:
        raise BadInputError("no input files given")
    errors = []
    for p in paths:
        try:
            check_input(p)
        except BadInputError as e:
            errors.append(e)
    if errors:
        more = f" (and {len(errors) - 1} more bad inputs)" if len(errors) > 1 else ""
        raise BadInputError(f"{errors[0]}{more}") from errors[0]


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, EOFError):
        return "compressed data ends early (file truncated?)"
    return f"{type(e).__name__}: {e}"


@dataclass
class FileStats:
    """What one input file gave: documents, skipped empty ones, and bad records by kind."""

    path: str
    records: int = 0
    documents: int = 0
    empty: int = 0
    bad: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BAD_KINDS, 0))

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


def is_jsonl(path: str | os.PathLike) -> bool:
    name = str(path).lower().removesuffix(".gz")
    return name.endswith(JSONL_SUFFIXES)


def open_binary(path: str | os.PathLike) -> IO[bytes]:
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")


class DocumentReader:
    """Iterates documents over many files in order, keeping one FileStats per file."""

    def __init__(
        self, text_field: str = "text", text_mode: str = "file", max_bad_fraction: float = 0.01
    ):
        if text_mode not in TEXT_MODES:
            raise BadInputError(f"--text-mode must be one of {TEXT_MODES}, got {text_mode!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise BadInputError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
        self.text_field = text_field
        self.text_mode = text_mode
        self.max_bad_fraction = max_bad_fraction
        self.stats: list[FileStats] = []

    def iter_documents(self, paths: Iterable[str | os.PathLike]) -> Iterator[str]:
        for path in paths:
            stats = FileStats(path=str(path))
            self.stats.append(stats)
            check_input(path)
            try:
                with open_binary(path) as f:
                    if is_jsonl(path):
                        yield from self._jsonl(f, stats)
                    elif self.text_mode == "line":
                        yield from self._text_lines(f, stats)
                    else:
                        yield from self._text_file(f, stats)
            except (OSError, EOFError, zlib.error) as e:
                raise BadInputError(
                    f"{path}: cannot read input after {stats.records} records: {_reason(e)}"
                ) from e
            self._check(stats)

    def _check(self, stats: FileStats) -> None:
        if stats.records and stats.bad_total / stats.records > self.max_bad_fraction:
            kinds = ", ".join(f"{k}={v}" for k, v in stats.bad.items() if v)
            raise BadInputError(
                f"{stats.path}: {stats.bad_total} of {stats.records} records are bad ({kinds}), "
                f"over the limit max_bad_fraction={self.max_bad_fraction}; fix the file or raise "
                "the limit"
            )

    def _jsonl(self, f: IO[bytes], stats: FileStats) -> Iterator[str]:
        for raw in f:
            if not raw.strip():
                continue
            stats.records += 1
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.bad["non_utf8"] += 1
                continue
            except json.JSONDecodeError:
                stats.bad["invalid_json"] += 1
                continue
            text = obj.get(self.text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.bad["missing_field"] += 1
                continue
            try:  # JSON escapes can produce lone surrogates, which are not encodable text
                text.encode("utf-8")
            except UnicodeEncodeError:
                stats.bad["non_utf8"] += 1
                continue
            yield from self._emit(text, stats)

    def _text_lines(self, f: IO[bytes], stats: FileStats) -> Iterator[str]:
        for raw in f:
            line = raw.removesuffix(b"\n").removesuffix(b"\r")
            if not line:
                continue
            stats.records += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                stats.bad["non_utf8"] += 1
                continue
            yield from self._emit(text, stats)

    def _text_file(self, f: IO[bytes], stats: FileStats) -> Iterator[str]:
        # One document; undecodable lines are dropped from it and counted, line endings kept.
        parts: list[str] = []
        for raw in f:
            stats.records += 1
            try:
                parts.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.bad["non_utf8"] += 1
        yield from self._emit("".join(parts), stats)

    @staticmethod
    def _emit(text: str, stats: FileStats) -> Iterator[str]:
        if text:
            stats.documents += 1
            yield text
        else:
            stats.empty += 1


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: <message>`` line and exit code 2, like
    every other bad input of the tools (argparse's own form is ``prog: error: ...``)."""

    def error(self, message: str):
        print(self.format_usage().rstrip(), file=sys.stderr)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_input_arguments(parser: argparse.ArgumentParser) -> None:
    """The input options shared by tools/train_tokenizer.py and tools/preprocess.py."""
    parser.add_argument(
        "inputs", nargs="+", help="text, .jsonl/.json/.ndjson files, optionally .gz"
    )
    parser.add_argument(
        "--text-field", default="text", help="JSONL field holding the document text"
    )
    parser.add_argument(
        "--text-mode",
        choices=("file", "line"),
        default="file",
        help="plain text: one document per file, or one per non-empty line",
    )
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.01,
        help="fail when more than this fraction of a file's records are bad",
    )
    parser.add_argument("--no-progress", action="store_true")
