"""Indexed, verified random access to the samples of webdataset tar shards.

webdataset 1.0.2 has no `wids`, so the index comes from the stdlib: `tarfile` lists every
member with its data offset and size (checksummed headers, pax/GNU extensions handled), and a
sample is then one `os.pread` of its two (three with a loss mask) adjacent members. Nothing is unpickled or decoded by
extension: records are raw little-endian arrays (see zenlm.data.format).

Verification when a shard is first opened in a process (every failure names the shard path):
the file exists; every member is a regular file named `<key>.tokens` / `<key>.docstarts` (and
`<key>.lossmask` in every sample when the manifest has a loss mask, never otherwise) with the
keys the manifest implies, in order; token and loss-mask records have the exact byte size (a
wrong size names the shard and the record); every member lies
inside the file; the sample count equals the manifest's. A truncated file, a garbled header (the
tar reader stops at the first bad checksum, so the count falls short) or a swapped shard all fail
here. Flipped bytes inside token data pass these checks; `verify_checksums=True` also compares
the whole file's sha256 with the manifest (costs one full read of every shard per process).
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Callable
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
    mask_bytes: int = 0
    """Bytes of one `.lossmask` record: seq_len + 1 (uint8); 0 = the corpus has no loss mask,
    and a `.lossmask` member is then an error."""

    def min_file_bytes(self) -> int:
        """A lower bound on a complete shard's size (headers + padded tokens and mask)."""
        per_sample = 2 * HEADER_BYTES + _padded(self.token_bytes)
        if self.mask_bytes:
            per_sample += HEADER_BYTES + _padded(self.mask_bytes)
        return self.samples * per_sample


def _padded(n: int) -> int:
    return -(-n // HEADER_BYTES) * HEADER_BYTES


def shard_specs(
    corpus_dir: str | os.PathLike, manifest: fmt.CorpusManifest, split: str
) -> list[ShardSpec]:
    """What `manifest` promises about each shard of `split` (none when it has no such split)."""
    token_bytes = manifest.tokens_per_sample * np.dtype(manifest.dtype).itemsize
    mask_bytes = manifest.tokens_per_sample if manifest.loss_mask else 0
    specs, first = [], 0
    for s in manifest.splits.get(split, fmt.SplitInfo()).shards:
        path = os.path.join(corpus_dir, s.path)
        specs.append(ShardSpec(path, s.samples, first, s.sha256, token_bytes, mask_bytes))
        first += s.samples
    return specs


# One entry per sample: (read offset, read length, tokens offset in the read, docstarts offset in
# the read, docstarts length, loss-mask offset in the read or -1 without one). The members are
# adjacent in every shard TarWriter writes (one header apart; pax writers add a few more blocks),
# so one pread covers them all.
Span = tuple[int, int, int, int, int, int]
Member = tuple[str, int, int]
"""(name, data offset, data size) of one tar member, in file order."""
_ZERO_BLOCK = bytes(HEADER_BYTES)
MAX_GAP_BYTES = 65536
"""Most header bytes between a sample's two members that one read may span."""


def check_shard_file(spec: ShardSpec) -> None:
    """Cheap start-up check (one stat): present and not obviously truncated.

    A file too small for the manifest's samples gets one more read (its first header) to tell
    a truncated shard from one whose records are another size than the manifest's dtype and
    seq_len make (an edited manifest, or a shard of another corpus)."""
    try:
        st = os.stat(spec.path)
    except OSError as e:
        raise CorpusError(f"{spec.path}: shard missing or unreadable ({e.strerror})") from e
    if not stat.S_ISREG(st.st_mode):
        raise CorpusError(f"{spec.path}: shard is not a regular file (a directory?)")
    size = st.st_size
    if size < spec.min_file_bytes():
        first = _first_members(spec.path, 3)
        for name, _, n in first:
            _check_record_size(spec, name, n)
        if spec.mask_bytes and first:  # a shard without the masks the manifest promises
            key = first[0][0].partition(".")[0]
            exts = sorted(n.partition(".")[2] for n, _, _ in first if n.startswith(key + "."))
            if fmt.LOSSMASK_EXT not in exts and len(exts) < len(first):
                raise CorpusError(
                    f"{spec.path}: sample {key} has members {exts} (no loss mask, but the "
                    "manifest has loss_mask true)"
                )
        if not first and size >= HEADER_BYTES:
            raise CorpusError(_bad_header(spec.path, 0))
        raise CorpusError(
            f"{spec.path}: shard truncated: {size} bytes, but {spec.samples} samples need at least "
            f"{spec.min_file_bytes()}"
        )


def record_size_error(spec: ShardSpec, name: str, size: int) -> CorpusError:
    if name.endswith("." + fmt.LOSSMASK_EXT):
        return CorpusError(
            f"{spec.path}: loss-mask record {name} has {size} bytes, but the manifest's seq_len "
            f"makes {spec.mask_bytes} (one uint8 per token, seq_len + 1): the manifest was edited "
            "or the shard is from another corpus; re-run tools/preprocess_sft.py"
        )
    return CorpusError(
        f"{spec.path}: token record {name} has {size} bytes, but the manifest's seq_len and dtype "
        f"make {spec.token_bytes} bytes per sample (seq_len + 1 ids x itemsize): the manifest "
        "was edited or the shard is from another corpus; re-run tools/preprocess.py"
    )


def _check_record_size(spec: ShardSpec, name: str, size: int) -> None:
    """The size of a `.tokens` record, and of a `.lossmask` one in a corpus that has them."""
    if name.endswith("." + fmt.TOKENS_EXT) and size != spec.token_bytes:
        raise record_size_error(spec, name, size)
    if name.endswith("." + fmt.LOSSMASK_EXT) and spec.mask_bytes and size != spec.mask_bytes:
        raise record_size_error(spec, name, size)


def _first_members(path: str, count: int) -> list[Member]:
    """Up to `count` members from the first headers, as long as they are valid plain ustar."""
    out: list[Member] = []
    try:
        with open(path, "rb") as f:
            off = 0
            while len(out) < count:
                f.seek(off)
                buf = f.read(HEADER_BYTES)
                if len(buf) < HEADER_BYTES or buf[257:262] != b"ustar":
                    break
                if _first_bad_checksum([buf]) >= 0:
                    break
                size = _octal(buf[124:136])
                name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                out.append((name, off + HEADER_BYTES, size))
                off += HEADER_BYTES + -(-size // HEADER_BYTES) * HEADER_BYTES
    except (OSError, ValueError):
        pass
    return out


def _first_bad_checksum(headers: list[bytes]) -> int:
    """Index of the first header whose checksum fails (tarfile's rule, both sums), or -1."""
    if not headers:
        return -1
    u = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), HEADER_BYTES)
    blank = 8 * ord(" ")  # the checksum field counts as spaces
    unsigned = u.sum(1, dtype=np.int64) - u[:, 148:156].sum(1, dtype=np.int64) + blank
    i8 = u.view(np.int8)
    signed = i8.sum(1, dtype=np.int64) - i8[:, 148:156].sum(1, dtype=np.int64) + blank
    field = u[:, 148:156]
    if ((field[:, :6] >= 48) & (field[:, :6] <= 55)).all() and (field[:, 6] == 0).all():
        # every field as tarfile writes it, "%06o\0 ": parse all at once
        stored = (field[:, :6].astype(np.int64) - 48) @ (8 ** np.arange(5, -1, -1))
    else:
        stored = np.array([_octal_or(h[148:156], -1) for h in headers], np.int64)
    bad = np.flatnonzero((stored != unsigned) & (stored != signed))
    return int(bad[0]) if len(bad) else -1


def _octal(field: bytes) -> int:
    """A tar header's octal number field; ValueError when it is not one."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _octal_or(field: bytes, default: int) -> int:
    try:
        return _octal(field)
    except ValueError:
        return default


def _scan_plain_ustar(
    fd: int, size: int, path: str, data: memoryview | None = None
) -> list[Member] | None:
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
        buf = (
            os.pread(fd, HEADER_BYTES, off)
            if data is None
            else bytes(data[off : off + HEADER_BYTES])
        )
        if buf == _ZERO_BLOCK:
            break
        plain = buf[156] in (0, 0x30) and buf[257:262] == b"ustar" and buf[345] == 0
        if not plain or buf[124] & 0x80:
            bad = _first_bad_checksum([*headers, buf])
            if bad >= 0:
                at = members[bad][1] - HEADER_BYTES if bad < len(members) else off
                raise CorpusError(_bad_header(path, at))
            return None
        try:  # (an unparsable checksum field fails the checksum pass below)
            n = _octal(buf[124:136])
        except ValueError:
            raise CorpusError(f"{path}: corrupt tar header at byte {off}") from None
        name = buf[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        headers.append(buf)
        members.append((name, off + HEADER_BYTES, n))
        off += HEADER_BYTES + -(-n // HEADER_BYTES) * HEADER_BYTES
    bad = _first_bad_checksum(headers)
    if bad >= 0:
        raise CorpusError(_bad_header(path, members[bad][1] - HEADER_BYTES))
    return members


def _bad_header(path: str, at: int) -> str:
    hint = " (not a tar file at all?)" if at == 0 else ""
    return (
        f"{path}: corrupt tar header (bad checksum) at byte {at}{hint}; the shard is damaged or "
        "was replaced: restore it or re-run tools/preprocess.py into a new directory"
    )


def _scan_tarfile(fd: int, path: str) -> list[Member]:
    try:
        with os.fdopen(os.dup(fd), "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            listed = [(info.name, info.offset_data, info.size, info.isfile()) for info in tf]
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise CorpusError(f"{path}: corrupt tar shard ({type(e).__name__}: {e})") from e
    for name, _, _, isfile in listed:
        if not isfile:
            raise CorpusError(f"{path}: member {name!r} is not a regular file")
    return [m[:3] for m in listed]


def build_index(
    spec: ShardSpec, fd: int, verify_checksums: bool, data: memoryview | None = None
) -> list[Span]:
    """List every sample's byte span, verifying the shard against `spec` (see module doc).

    `data`, the whole file already in memory (verify_shard), saves the header reads."""
    size = os.fstat(fd).st_size
    if verify_checksums:
        with open(spec.path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != spec.sha256:
            raise CorpusError(
                f"{spec.path}: sha256 {digest[:16]}… does not match the manifest's "
                f"{spec.sha256[:16]}… (shard corrupt, or replaced by another corpus's); restore "
                "it or re-run tools/preprocess.py into a new directory"
            )
    listed = _scan_plain_ustar(fd, size, spec.path, data)
    if listed is None:
        listed = _scan_tarfile(fd, spec.path)
    return group_samples(spec, listed, size)


def group_samples(spec: ShardSpec, listed: list[Member], size: int) -> list[Span]:
    """Members (in file order) -> one Span per sample; checks keys, sizes, bounds, count."""
    members: dict[str, tuple[int, int]] = {}
    spans: list[Span] = []
    key = fmt.sample_key(spec.first_key)
    expected = {fmt.TOKENS_EXT, fmt.DOCSTARTS_EXT} | (
        {fmt.LOSSMASK_EXT} if spec.mask_bytes else set()
    )

    def close_sample() -> None:
        if set(members) != expected:
            why = ""
            if fmt.LOSSMASK_EXT in members and not spec.mask_bytes:
                why = " (a loss mask, but the manifest has loss_mask false)"
            elif spec.mask_bytes and fmt.LOSSMASK_EXT not in members:
                why = " (no loss mask, but the manifest has loss_mask true)"
            raise CorpusError(f"{spec.path}: sample {key} has members {sorted(members)}{why}")
        (t_off, t_len), (d_off, d_len) = members[fmt.TOKENS_EXT], members[fmt.DOCSTARTS_EXT]
        if t_len != spec.token_bytes:
            raise record_size_error(spec, f"{key}.tokens", t_len)
        if d_len % 4:
            raise CorpusError(
                f"{spec.path}: {key}.docstarts has {d_len} bytes, not a multiple of 4"
            )
        lo, hi = min(t_off, d_off), max(t_off + t_len, d_off + d_len)
        total = t_len + d_len
        m_off = -1
        if spec.mask_bytes:
            m_off, m_len = members[fmt.LOSSMASK_EXT]
            if m_len != spec.mask_bytes:
                raise record_size_error(spec, f"{key}.{fmt.LOSSMASK_EXT}", m_len)
            lo, hi, total = min(lo, m_off), max(hi, m_off + m_len), total + m_len
        if hi - lo > total + (len(expected) - 1) * MAX_GAP_BYTES:
            raise CorpusError(f"{spec.path}: members of {key} are over {MAX_GAP_BYTES} bytes apart")
        spans.append((lo, hi - lo, t_off - lo, d_off - lo, d_len, m_off - lo if m_off >= 0 else -1))
        members.clear()

    for name, offset, n in listed:
        stem, _, ext = name.partition(".")
        if offset + n > size:
            raise CorpusError(
                f"{spec.path}: member {name!r} at byte {offset} is not a complete file"
            )
        if stem != key:
            if not members:
                raise CorpusError(_wrong_key(spec, name, key))
            close_sample()
            key = fmt.sample_key(spec.first_key + len(spans))
            if stem != key:
                raise CorpusError(_wrong_key(spec, name, key))
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


HASH_BLOCK = 8 << 20


def shard_sha256(path: str, on_bytes: Callable[[int], None] | None = None) -> str:
    """sha256 of a whole shard, read in 8 MiB blocks (on_bytes(n) after each, for progress)."""
    return _read_hashed(path, on_bytes, keep=False)[0]


def _read_hashed(
    path: str, on_bytes: Callable[[int], None] | None, keep: bool
) -> tuple[str, bytearray | None]:
    """(sha256, the file's bytes when keep) from one sequential read in 8 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size) if keep else None
        buf = memoryview(data) if keep else memoryview(bytearray(HASH_BLOCK))
        off = 0
        while True:
            block = buf[off : off + HASH_BLOCK] if keep else buf
            n = f.readinto(block) if len(block) else 0
            if not n:
                break
            h.update(block[:n])
            off += n
            if on_bytes is not None:
                on_bytes(n)
    if keep and off != size:
        raise CorpusError(f"{path}: shard changed size while being read")
    return h.hexdigest(), data


def verify_shard(
    spec: ShardSpec,
    dtype: str,
    vocab_size: int,
    on_bytes: Callable[[int], None] | None = None,
) -> int:
    """Check one shard completely (what tools/verify_corpus.py runs per shard); returns its
    tokens. Raises CorpusError naming the shard at the first problem: missing or truncated
    file, tar structure and member names/sizes/count (build_index), a token id >= vocab_size,
    a doc start outside [1, seq_len] or not increasing, and the sha256 against the manifest
    (checked last, so a structural problem gets its own message). Reads the file once, into
    memory (a shard's size)."""
    check_shard_file(spec)
    try:
        digest, data = _read_hashed(spec.path, on_bytes, keep=True)
        fd = os.open(spec.path, os.O_RDONLY)
    except OSError as e:
        raise CorpusError(f"{spec.path}: shard unreadable ({e.strerror})") from e
    try:
        spans = build_index(spec, fd, verify_checksums=False, data=memoryview(data))
    finally:
        os.close(fd)
    _check_records(spec, np.dtype(dtype), vocab_size, spans, data)
    if digest != spec.sha256:
        raise CorpusError(
            f"{spec.path}: sha256 {digest[:16]}… does not match the manifest's "
            f"{spec.sha256[:16]}… (bytes changed, or the shard was replaced by another "
            "corpus's); restore it or re-run tools/preprocess.py into a new directory"
        )
    return len(spans) * (spec.token_bytes // np.dtype(dtype).itemsize)


def verify_shard_job(job: tuple[ShardSpec, str, int]) -> tuple[int, str | None]:
    """verify_shard(*job) as (tokens, None) or (0, the error message), for worker processes
    (tools/verify_corpus.py --workers)."""
    try:
        return verify_shard(*job), None
    except CorpusError as e:
        return 0, str(e)


def _check_records(
    spec: ShardSpec, dtype: np.dtype, vocab_size: int, spans: list[Span], data: bytearray
) -> None:
    """Every token id < vocab_size, every doc start in [1, seq_len], increasing per sample, and
    every loss-mask value 0 or 1.

    Vectorised over the whole shard: tar data starts on 512-byte blocks, so every record is
    aligned to its item size and the file can be viewed as one array of ids; the per-sample
    maxima are one np.maximum.reduceat over [start, end) pairs."""
    if not spans:
        return
    n_tok = spec.token_bytes // dtype.itemsize
    seq_len = n_tok - 1
    sp = np.array(spans, np.int64)  # (off, length, t_rel, d_rel, d_len) per sample
    t_off, d_off, d_len = sp[:, 0] + sp[:, 2], sp[:, 0] + sp[:, 3], sp[:, 4]
    if (t_off % dtype.itemsize).any() or (d_off[d_len > 0] % 4).any():
        raise CorpusError(f"{spec.path}: tar members not on block boundaries (not a tar file?)")
    ids = np.frombuffer(data, dtype, len(data) // dtype.itemsize)
    first = t_off // dtype.itemsize
    bounds = np.stack([first, first + n_tok], 1).ravel()
    if bounds[-1] == len(ids):  # reduceat needs indices < len: the last sample ends the file
        ids = np.concatenate([ids, np.zeros(1, dtype)])
    row_max = np.maximum.reduceat(ids, bounds)[0::2]
    if int(row_max.max()) >= vocab_size:
        row = int(np.argmax(row_max >= vocab_size))
        tokens = ids[first[row] : first[row] + n_tok]
        col = int(np.argmax(tokens >= vocab_size))
        raise CorpusError(
            f"{spec.path}: sample {fmt.sample_key(spec.first_key + row)} token {col} is id "
            f"{int(tokens[col])}, not below the manifest's vocab_size {vocab_size} (corrupt "
            "data, or a shard of a corpus with another tokenizer)"
        )
    if spec.mask_bytes:
        _check_masks(spec, sp[:, 0] + sp[:, 5], data)
    counts = d_len // 4
    if not counts.any():
        return
    words = np.frombuffer(data, "<u4", len(data) // 4)
    which = np.repeat(np.arange(len(spans)), counts)
    within = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
    ds = words[np.repeat(d_off // 4, counts) + within].astype(np.int64)
    bad = (ds < 1) | (ds > seq_len)
    same_row = which[1:] == which[:-1]
    unordered = np.flatnonzero(same_row & (ds[1:] <= ds[:-1]))
    if bad.any() or len(unordered):
        i = int(np.argmax(bad)) if bad.any() else int(unordered[0]) + 1
        what = f"outside [1, {seq_len}]" if bad[i] else "not after the previous one"
        raise CorpusError(
            f"{spec.path}: sample {fmt.sample_key(spec.first_key + int(which[i]))} has doc "
            f"start {int(ds[i])} {what} (corrupt docstarts record)"
        )


def _check_masks(spec: ShardSpec, m_off: np.ndarray, data: bytearray) -> None:
    """Every loss-mask value 0 or 1: per-sample maxima in one reduceat, like the token ids."""
    u8 = np.frombuffer(data, np.uint8)
    bounds = np.stack([m_off, m_off + spec.mask_bytes], 1).ravel()
    if bounds[-1] == len(u8):
        u8 = np.concatenate([u8, np.zeros(1, np.uint8)])
    row_max = np.maximum.reduceat(u8, bounds)[0::2]
    if int(row_max.max()) > 1:
        row = int(np.argmax(row_max > 1))
        values = u8[m_off[row] : m_off[row] + spec.mask_bytes]
        col = int(np.argmax(values > 1))
        raise CorpusError(
            f"{spec.path}: sample {fmt.sample_key(spec.first_key + row)} loss-mask entry {col} "
            f"is {int(values[col])}, not 0 or 1 (corrupt lossmask record)"
        )


def _wrong_key(spec: ShardSpec, name: str, key: str) -> str:
    return (
        f"{spec.path}: member {name!r} where key {key} was expected: not the shard the manifest "
        "lists at this place (copied from another shard or corpus?); restore it or re-run "
        "tools/preprocess.py into a new directory"
    )


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
