"""Indexed, verified random access to the samples of webdataset tar shards.

webdataset 1.0.2 has no `wids`, so the index comes from the stdlib: `tarfile` lists every
member with its data offset and size (checksummed headers, pax/GNU extensions handled), and a
sample is then one `os.pread` of its two adjacent members. Nothing is unpickled or decoded by
extension: records are raw little-endian arrays (see zenlm.data.format).

Verification when a shard is first opened in a process (every failure names the shard path):
the file exists; every member is a regular file named `<key>.tokens` / `<key>.docstarts` with the
keys the manifest implies, in order; token records have the exact byte size; every member lies
inside the file; the sample count equals the manifest's. A truncated file, a garbled header (the
tar reader stops at the first bad checksum, so the count falls short) or a swapped shard all fail
here. Flipped bytes inside token data pass these checks; `verify_checksums=True` also compares
the whole file's sha256 with the manifest (costs one full read of every shard per process).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from zenlm.data import format as fmt
from zenlm.data.format import CorpusError

HEADER_BYTES = 512


@dataclass(frozen=True)
class ShardSpec:
    """What the manifest promises about one shard."""

    path: str
    samples: int
    first_key: int
    """index_in_split of the shard's first sample: its members are keyed from here on."""
    sha256: str
    token_bytes: int
    """Bytes of one `.tokens` record: (seq_len + 1) * itemsize."""

    def min_file_bytes(self) -> int:
        """A lower bound on a complete shard's size (two headers + padded tokens per sample)."""
        padded = -(-self.token_bytes // HEADER_BYTES) * HEADER_BYTES
        return self.samples * (2 * HEADER_BYTES + padded)


# One entry per sample: (read offset, read length, tokens offset in the read, docstarts offset in
# the read, docstarts length). The two members are adjacent in every shard TarWriter writes (one
# header apart; pax writers add a few more blocks), so one pread covers both.
Span = tuple[int, int, int, int, int]
Member = tuple[str, int, int]
"""(name, data offset, data size) of one tar member, in file order."""
_ZERO_BLOCK = bytes(HEADER_BYTES)
MAX_GAP_BYTES = 65536
"""Most header bytes between a sample's two members that one read may span."""


def check_shard_file(spec: ShardSpec) -> None:
    """Cheap start-up check (one stat): present and not obviously truncated."""
    try:
        size = os.stat(spec.path).st_size
    except OSError as e:
        raise CorpusError(f"{spec.path}: shard missing or unreadable ({e.strerror})") from e
    if size < spec.min_file_bytes():
        raise CorpusError(
            f"{spec.path}: shard truncated: {size} bytes, but {spec.samples} samples need at least "
            f"{spec.min_file_bytes()}"
        )


def _first_bad_checksum(headers: list[bytes]) -> int:
    """Index of the first header whose checksum fails (tarfile's rule, both sums), or -1."""
    if not headers:
        return -1
    u = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), HEADER_BYTES)
    blank = 8 * ord(" ")  # the checksum field counts as spaces
    unsigned = u.sum(1, dtype=np.int64) - u[:, 148:156].sum(1, dtype=np.int64) + blank
    i8 = u.view(np.int8)
    signed = i8.sum(1, dtype=np.int64) - i8[:, 148:156].sum(1, dtype=np.int64) + blank
    stored = np.array([_octal(h[148:156]) for h in headers], np.int64)
    bad = np.flatnonzero((stored != unsigned) & (stored != signed))
    return int(bad[0]) if len(bad) else -1


def _octal(field: bytes) -> int:
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _scan_plain_ustar(fd: int, size: int, path: str) -> list[Member] | None:
    """Members of a tar whose headers are all plain ustar regular files, or None for others.

    tarfile's header parsing costs about as much as streaming the whole shard, so this reads
    only the fields a plain ustar file header has (name, size, type, checksum) and verifies
    every checksum at the end in one vectorised pass. Anything else (pax or GNU extensions,
    long names, base-256 sizes, links) returns None and build_index falls back to tarfile.
    """
    members: list[Member] = []
    headers: list[bytes] = []
    off = 0
    while off + HEADER_BYTES <= size:
        buf = os.pread(fd, HEADER_BYTES, off)
        if buf == _ZERO_BLOCK:
            break
        plain = buf[156] in (0, 0x30) and buf[257:262] == b"ustar" and buf[345] == 0
        if not plain or buf[124] & 0x80:
            bad = _first_bad_checksum([*headers, buf])
            if bad >= 0:
                at = members[bad][1] - HEADER_BYTES if bad < len(members) else off
                raise CorpusError(f"{path}: corrupt tar header (bad checksum) at byte {at}")
            return None
        try:
            n = _octal(buf[124:136])
            _octal(buf[148:156])
        except ValueError:
            raise CorpusError(f"{path}: corrupt tar header at byte {off}") from None
        name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        headers.append(buf)
        members.append((name, off + HEADER_BYTES, n))
        off += HEADER_BYTES + -(-n // HEADER_BYTES) * HEADER_BYTES
    bad = _first_bad_checksum(headers)
    if bad >= 0:
        raise CorpusError(
            f"{path}: corrupt tar header (bad checksum) at byte {members[bad][1] - HEADER_BYTES}"
        )
    return members


def _scan_tarfile(fd: int, path: str) -> list[Member]:
    try:
        with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            listed = [(info.name, info.offset_data, info.size, info.isfile()) for info in tf]
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as e:
        raise CorpusError(f"{path}: corrupt tar shard ({type(e).__name__}: {e})") from e
    for name, _, _, isfile in listed:
        if not isfile:
            raise CorpusError(f"{path}: member {name!r} is not a regular file")
    return [m[:3] for m in listed]


def build_index(spec: ShardSpec, fd: int, verify_checksums: bool) -> list[Span]:
    """List every sample's byte span, verifying the shard against `spec` (see module doc)."""
    size = os.fstat(fd).st_size
    if verify_checksums:
        with open(spec.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != spec.sha256:
            raise CorpusError(
                f"{spec.path}: sha256 {digest[:16]}… does not match the manifest's "
                f"{spec.sha256[:16]}… (shard corrupt or replaced)"
            )
    listed = _scan_plain_ustar(fd, size, spec.path)
    if listed is None:
        listed = _scan_tarfile(fd, spec.path)
    return group_samples(spec, listed, size)


def group_samples(spec: ShardSpec, listed: list[Member], size: int) -> list[Span]:
    """Members (in file order) -> one Span per sample; checks keys, sizes, bounds, count."""
    members: dict[str, tuple[int, int]] = {}
    spans: list[Span] = []
    key = fmt.sample_key(spec.first_key)

    def close_sample() -> None:
        if set(members) != {fmt.TOKENS_EXT, fmt.DOCSTARTS_EXT}:
            raise CorpusError(f"{spec.path}: sample {key} has members {sorted(members)}")
        (t_off, t_len), (d_off, d_len) = members[fmt.TOKENS_EXT], members[fmt.DOCSTARTS_EXT]
        if t_len != spec.token_bytes:
            raise CorpusError(
                f"{spec.path}: {key}.tokens has {t_len} bytes, not {spec.token_bytes}"
            )
        if d_len % 4:
            raise CorpusError(
                f"{spec.path}: {key}.docstarts has {d_len} bytes, not a multiple of 4"
            )
        lo, hi = min(t_off, d_off), max(t_off + t_len, d_off + d_len)
        if hi - lo > t_len + d_len + MAX_GAP_BYTES:
            raise CorpusError(f"{spec.path}: members of {key} are over {MAX_GAP_BYTES} bytes apart")
        spans.append((lo, hi - lo, t_off - lo, d_off - lo, d_len))
        members.clear()

    for name, offset, n in listed:
        stem, _, ext = name.partition(".")
        if offset + n > size:
            raise CorpusError(
                f"{spec.path}: member {name!r} at byte {offset} is not a complete file"
            )
        if stem != key:
            if not members:
                raise CorpusError(f"{spec.path}: member {name!r} where key {key} was expected")
            close_sample()
            key = fmt.sample_key(spec.first_key + len(spans))
            if stem != key:
                raise CorpusError(f"{spec.path}: member {name!r} where key {key} was expected")
        if ext in members:
            raise CorpusError(f"{spec.path}: duplicate member {name!r}")
        members[ext] = (offset, n)
    if members:
        close_sample()
    if len(spans) != spec.samples:
        raise CorpusError(
            f"{spec.path}: shard holds {len(spans)} readable samples but the manifest lists "
            f"{spec.samples} (truncated or corrupt tar)"
        )
    return spans


class ShardCache:
    """Per-process open shards: fd + verified index, least recently used closed first.

    Safe across fork (DataLoader workers): pread has no file position, so inherited fds work.
    """

    def __init__(self, verify_checksums: bool = False, max_open: int = 32) -> None:
        self.verify_checksums = verify_checksums
        self.max_open = max_open
        self._open: OrderedDict[str, tuple[int, list[Span]]] = OrderedDict()

    def get(self, spec: ShardSpec) -> tuple[int, list[Span]]:
        hit = self._open.get(spec.path)
        if hit is not None:
            self._open.move_to_end(spec.path)
            return hit
        check_shard_file(spec)
        fd = os.open(spec.path, os.O_RDONLY)
        try:
            entry = (fd, build_index(spec, fd, self.verify_checksums))
        except BaseException:
            os.close(fd)
            raise
        self._open[spec.path] = entry
        while len(self._open) > self.max_open:
            os.close(self._open.popitem(last=False)[1][0])
        return entry

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1][0])
