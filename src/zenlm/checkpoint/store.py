"""The checkpoint directory: atomic commit, `latest`, retention, discovery with verification.

    <dir>/step_00000500/    meta.json (written last) + the files it lists with CRC-32 and size
    <dir>/latest            "step_00000500\\n" (a hint for people and tools)
    <dir>/.tmp.step_...     a save in progress; never read; removed by the next save
    <dir>/.trash.step_...   a checkpoint being deleted; never read

A save writes every file into .tmp.step_N, fsyncs each, writes meta.json (with every other file's
CRC-32) last, fsyncs the directory, renames it to step_N, fsyncs the parent, then replaces
`latest` the same way (write, fsync, rename). A crash at any point leaves either no step_N or a
complete one; a step_N whose files do not match meta.json (disk corruption, manual edits) is
rejected by `verify` and never chosen. Deletion renames to .trash first, so a half-deleted
checkpoint is never mistaken for one.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from zenlm.checkpoint.io import (
    CheckpointError,
    FileRecord,
    file_checksum,
    fsync_dir,
    read_json,
    write_bytes,
    write_json,
)

FORMAT = "zenlm-checkpoint"
FORMAT_VERSION = 1
META = "meta.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


class CheckpointStore:
    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # -- writing (rank 0 only, except that every rank writes its files into tmp_dir) ---------

    def tmp_dir(self, step: int) -> Path:
        return self.root / f".tmp.{step_dir_name(step)}"

    def begin(self, step: int) -> Path:
        """A fresh, empty temporary directory for step's files (stale saves removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp.*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in self.root.glob(".trash.*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_dir(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int, files: dict[str, FileRecord], meta: dict[str, Any]) -> Path:
        """meta.json last, then the directory rename, then `latest`. Returns the final path."""
        tmp, final = self.tmp_dir(step), self.root / step_dir_name(step)
        for name, rec in files.items():
            if not (tmp / name).is_file():
                raise CheckpointError(f"{tmp / name} is missing: a rank did not write its file")
            if (tmp / name).stat().st_size != rec.bytes:
                raise CheckpointError(f"{tmp / name} has the wrong size")
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **meta,
            "step": step,
            "files": {n: {"crc32": r.crc32, "bytes": r.bytes} for n, r in sorted(files.items())},
        }
        write_json(tmp / META, body)
        fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
            self._discard(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        self._write_latest(final.name)
        return final

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        write_bytes(tmp, f"{name}\n".encode())
        os.replace(tmp, self.root / LATEST)
        fsync_dir(self.root)

    def _discard(self, path: Path) -> None:
        trash = self.root / f".trash.{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def set_aside(self, step: int) -> Path:
        """Rename step_N to step_N.kept-<unix time>: out of discovery, never deleted by zenlm.
        Used instead of overwriting a checkpoint this run did not read (see session.py)."""
        src = self.path(step)
        dst = src.with_name(f"{src.name}.kept-{int(time.time())}")
        os.rename(src, dst)
        fsync_dir(self.root)
        return dst

    def prune(
        self, keep_last: int, keep_every_steps: int = 0, protected: Iterable[int] = ()
    ) -> list[int]:
        """Delete all but the newest `keep_last` (and multiples of keep_every_steps); return them.
        `protected` steps are neither counted nor deleted."""
        spared = set(protected)
        steps = [s for s in self.steps() if s not in spared]
        keep = set(steps[:keep_last]) if keep_last > 0 else set(steps)
        if keep_every_steps > 0:
            keep |= {s for s in steps if s % keep_every_steps == 0}
        doomed = [s for s in steps if s not in keep]
        for s in doomed:
            self._discard(self.root / step_dir_name(s))
        return doomed

    # -- reading -----------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Steps of committed-looking directories, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [
            int(m.group(1))
            for p in self.root.iterdir()
            if p.is_dir() and (m := _STEP_DIR.match(p.name))
        ]
        return sorted(found, reverse=True)

    def path(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def latest_hint(self) -> str | None:
        try:
            return (self.root / LATEST).read_text().strip() or None
        except OSError:
            return None


def read_meta(ckpt_dir: Path) -> dict[str, Any]:
    """meta.json of a checkpoint, checked for format and completeness of its file list."""
    meta = read_json(ckpt_dir / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt_dir / META}: not a zenlm checkpoint")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt_dir}: format_version {meta.get('format_version')} (this zenlm reads {FORMAT_VERSION})"
        )
    return meta


def file_records(meta: dict[str, Any]) -> dict[str, FileRecord]:
    return {n: FileRecord(r["crc32"], int(r["bytes"])) for n, r in meta["files"].items()}


def verify_files(ckpt_dir: Path, records: dict[str, FileRecord], names: list[str]) -> None:
    """Size and CRC-32 of the given files against meta.json; raise CheckpointError on mismatch."""
    for name in names:
        path = ckpt_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        rec = records[name]
        if path.stat().st_size != rec.bytes:
            raise CheckpointError(f"{path}: size {path.stat().st_size} != meta.json {rec.bytes}")
        if file_checksum(path) != rec:
            raise CheckpointError(f"{path}: CRC-32 does not match meta.json")


def verify(ckpt_dir: Path) -> dict[str, Any]:
    """Full single-process verification; returns meta. (Ranks split this work in session.py.)"""
    meta = read_meta(ckpt_dir)
    records = file_records(meta)
    verify_files(ckpt_dir, records, sorted(records))
    return meta


def newest_valid(store: CheckpointStore) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that verifies (single process: tools and tests; the Trainer splits
    the same checks over its ranks)."""
    for step in store.steps():
        try:
            return store.path(step), verify(store.path(step))
        except CheckpointError:
            continue
    return None
