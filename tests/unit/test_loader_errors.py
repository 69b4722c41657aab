"""A missing or corrupt shard, or a corpus that does not fit the run, fails naming the culprit."""

from __future__ import annotations

import io
import os
import re
import shutil
import tarfile

import numpy as np
import pytest

from zenlm.data import CorpusError, build_train_loader
from zenlm.data import format as fmt
from zenlm.data.shards import _scan_plain_ustar, _scan_tarfile
from zenlm.testing.corpus import TEST_FINGERPRINT, sample_identity, write_corpus

SEQ = 16


@pytest.fixture
def corpus(tmp_path):
    write_corpus(tmp_path / "c", [20, 30, 25], seq_len=SEQ)
    return tmp_path / "c"


def shard(corpus, i=1):
    return corpus / fmt.shard_name("train", i)


def read_epoch(corpus, workers=0, **kw):
    loader = build_train_loader([(corpus, 1.0)], SEQ, 5, 5, 0, 1, workers, **kw)
    for _ in range(75 // 5):
        next(loader)


def test_missing_shard_named_at_build(corpus):
    os.remove(shard(corpus))
    with pytest.raises(CorpusError, match=re.escape(f"{shard(corpus)}: shard missing")):
        read_epoch(corpus)


def test_truncated_shard_named_at_build(corpus):
    os.truncate(shard(corpus), shard(corpus).stat().st_size // 2)
    with pytest.raises(CorpusError, match=re.escape(f"{shard(corpus)}: shard truncated")):
        read_epoch(corpus)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncation_past_the_size_check_named_on_read(corpus, workers):
    # Cut inside the last samples but above the start-up lower bound on the file size.
    os.truncate(shard(corpus), 30 * (1024 + 512) + 700)
    with pytest.raises(
        CorpusError, match=re.escape(f"{shard(corpus)}: shard holds ") + r"\d+ readable samples"
    ):
        read_epoch(corpus, workers)


@pytest.mark.parametrize("member", [0, 1])  # the first header; a later one (its name)
def test_flipped_header_bytes_named(corpus, member):
    path = shard(corpus)
    with tarfile.open(path) as tf:
        at = tf.getmembers()[member].offset + 3
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x5A]))
    with pytest.raises(CorpusError, match=re.escape(f"{path}: corrupt tar header")):
        read_epoch(corpus)


def test_flipped_data_bytes_caught_by_checksum(corpus):
    path = shard(corpus, 0)
    with open(path, "r+b") as f:
        f.seek(2048)
        f.write(b"\x01\x02\x03")
    with pytest.raises(CorpusError, match=re.escape(f"{path}: sha256 ") + ".* does not match"):
        read_epoch(corpus, verify_checksums=True)


def test_out_of_vocab_ids_named(tmp_path):
    write_corpus(tmp_path / "c", [10], seq_len=SEQ, vocab_size=70000)  # uint32 ids
    manifest = fmt.load_manifest(tmp_path / "c")
    manifest.tokenizer.vocab_size = 500  # ids up to 69999 are now out of range
    fmt.write_manifest(tmp_path / "c", manifest)
    with pytest.raises(
        CorpusError, match=re.escape("train-000000.tar: token id >= vocab_size 500")
    ):
        next(build_train_loader([(tmp_path / "c", 1.0)], SEQ, 10, 10, 0, 1))


def test_tokenizer_mismatch_names_both_fingerprints(corpus):
    run_fp = "cd" * 32
    with pytest.raises(CorpusError) as err:
        build_train_loader([(corpus, 1.0)], SEQ, 5, 5, 0, 1, expected_tokenizer_fingerprint=run_fp)
    assert TEST_FINGERPRINT[:16] in str(err.value) and run_fp[:16] in str(err.value)


def test_blended_corpora_must_share_a_tokenizer(corpus, tmp_path):
    write_corpus(tmp_path / "other", [10], seq_len=SEQ, fingerprint="ef" * 32)
    with pytest.raises(CorpusError) as err:
        build_train_loader([(corpus, 1.0), (tmp_path / "other", 1.0)], SEQ, 5, 5, 0, 1)
    assert "ef" * 8 in str(err.value) and TEST_FINGERPRINT[:16] in str(err.value)


def test_seq_len_mismatch(corpus):
    with pytest.raises(CorpusError, match="seq_len is 16, the run uses 32"):
        build_train_loader([(corpus, 1.0)], 32, 5, 5, 0, 1)


def test_missing_manifest_and_split(corpus, tmp_path):
    with pytest.raises(CorpusError, match="no manifest"):
        build_train_loader([(tmp_path / "nowhere", 1.0)], SEQ, 5, 5, 0, 1)
    from zenlm.data import build_valid_loader

    with pytest.raises(CorpusError, match="no 'valid' samples"):
        build_valid_loader([(corpus, 1.0)], SEQ, 5, 0, 1, num_samples=2)


def test_fast_index_equals_tarfile_index(corpus):
    for i in range(3):
        fd = os.open(shard(corpus, i), os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            assert _scan_plain_ustar(fd, size, "x") == _scan_tarfile(fd, "x")
        finally:
            os.close(fd)


def test_pax_shard_falls_back_to_tarfile(corpus):
    """A shard written by another tool (pax headers) is read through tarfile, same samples."""
    path = shard(corpus, 1)
    with tarfile.open(path) as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as dst:
        for m, data in members:
            m.pax_headers = {"comment": "written elsewhere"}
            dst.addfile(m, io.BytesIO(data))
    fd = os.open(path, os.O_RDONLY)
    assert _scan_plain_ustar(fd, os.fstat(fd).st_size, str(path)) is None
    os.close(fd)
    loader = build_train_loader([(corpus, 1.0)], SEQ, 75, 75, 0, 1)
    ids = sample_identity(next(loader)["input_ids"])[:, 0]
    np.testing.assert_array_equal(np.sort(ids), np.arange(75))


# ---------------------------------------------------------------- shard content, verify on/off


def test_random_bytes_shard_named(corpus):
    path = shard(corpus)
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes())
    with pytest.raises(CorpusError, match=re.escape(f"{path}: corrupt tar header")):
        read_epoch(corpus)


@pytest.mark.parametrize("seq_len", [SEQ, 600])  # record padding hides the size; or it does not
def test_edited_manifest_dtype_is_a_record_size_mismatch(tmp_path, seq_len):
    write_corpus(tmp_path / "c", [6, 6], seq_len=seq_len)
    m = fmt.load_manifest(tmp_path / "c")
    m.dtype = "<u4"  # was '<u2'
    fmt.write_manifest(tmp_path / "c", m)
    with pytest.raises(CorpusError) as err:
        next(build_train_loader([(tmp_path / "c", 1.0)], seq_len, 4, 4, 0, 1))
    msg = str(err.value)
    assert re.search(r"train-00000[01]\.tar: token record", msg), msg  # shuffled: either one
    assert "manifest's seq_len and dtype" in msg, msg
    assert "truncated" not in msg


def copy_layout_twin(corpus, tmp_path, i=1):
    """Shard i replaced by the same-shaped shard of another corpus (other tag: other ids)."""
    write_corpus(tmp_path / "twin", [20, 30, 25], seq_len=SEQ, tag=7)
    shutil.copy(tmp_path / "twin" / fmt.shard_name("train", i), shard(corpus, i))


def test_shard_from_another_corpus_caught_with_verify(corpus, tmp_path):
    copy_layout_twin(corpus, tmp_path)
    read_epoch(corpus)  # same keys, sizes and count: only the checksum can tell
    with pytest.raises(CorpusError, match=re.escape(f"{shard(corpus)}: sha256 ")):
        read_epoch(corpus, verify_checksums=True)


@pytest.mark.parametrize("value", [b"\x05\x00", b"\xff\xff"])  # inside the vocab; beyond it
def test_bit_flipped_token_ids_caught_with_verify(corpus, value):
    path = shard(corpus, 2)
    with tarfile.open(path) as tf:
        at = next(m for m in tf.getmembers() if m.name.endswith(".tokens")).offset_data + 10
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(value)
    with pytest.raises(CorpusError, match=re.escape(f"{path}: sha256 ")):
        read_epoch(corpus, verify_checksums=True)
    if value == b"\xff\xff":  # without verification the vocabulary check still names it
        with pytest.raises(CorpusError, match=re.escape(f"{path}: token id >= vocab_size")):
            read_epoch(corpus)


@pytest.mark.parametrize("workers", [0, 2])
def test_verify_checksums_in_loader_workers(corpus, workers):
    path = shard(corpus, 0)
    with open(path, "r+b") as f:
        f.seek(2048)
        f.write(b"\x01\x02\x03")
    with pytest.raises(CorpusError, match=re.escape(f"{path}: sha256 ")):
        read_epoch(corpus, workers, verify_checksums=True)


def test_directory_in_place_of_a_shard_named(corpus):
    os.remove(shard(corpus))
    shard(corpus).mkdir()
    with pytest.raises(CorpusError, match=re.escape(f"{shard(corpus)}: shard is not a regular")):
        read_epoch(corpus)
