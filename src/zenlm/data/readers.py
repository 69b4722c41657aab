"""Input readers: plain text, JSONL, and either one gzipped, with bad-record counting per file.

Formats are chosen by file name: ``.jsonl`` / ``.json`` / ``.ndjson`` (optionally ``.gz``) are
JSON Lines with the document in `text_field`; anything else is UTF-8 text. A text file is either
one document (text_mode="file", the default) or one document per non-empty line ("line").

The record unit is a line in every format. A bad record (non-UTF-8 bytes, invalid JSON, a missing
or non-string field) is skipped and counted per file; when a file's bad fraction exceeds
`max_bad_fraction` the reader raises BadInputError naming the file, after reading it.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from zenlm.errors import ZenlmError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_MODES = ("file", "line")
BAD_KINDS = ("non_utf8", "invalid_json", "missing_field")


class BadInputError(ZenlmError, ValueError):
    """Too many bad records in one input file."""


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
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {text_mode!r}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.text_field = text_field
        self.text_mode = text_mode
        self.max_bad_fraction = max_bad_fraction
        self.stats: list[FileStats] = []

    def iter_documents(self, paths: Iterable[str | os.PathLike]) -> Iterator[str]:
        for path in paths:
            stats = FileStats(path=str(path))
            self.stats.append(stats)
            if not Path(path).is_file():
                raise FileNotFoundError(f"{path}: input file not found")
            with open_binary(path) as f:
                if is_jsonl(path):
                    yield from self._jsonl(f, stats)
                elif self.text_mode == "line":
                    yield from self._text_lines(f, stats)
                else:
                    yield from self._text_file(f, stats)
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
