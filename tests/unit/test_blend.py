"""Blending by weight (schedule and loader) and the validation iterator."""

from __future__ import annotations

import numpy as np
import pytest

from zenlm.data import BlendSchedule, build_train_loader, build_valid_loader
from zenlm.testing.corpus import sample_identity, write_corpus

SEQ = 8
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("blend")
    sizes = [[300, 211], [170, 160], [90, 77, 40]]  # small: the 10,000 samples span many epochs
    for tag, shards in enumerate(sizes):
        write_corpus(root / f"c{tag}", shards, SEQ, valid_shards=[5 + tag, 3], tag=tag)
    return [root / f"c{tag}" for tag in range(3)], [sum(s) for s in sizes]


def test_schedule_counts_track_weights():
    sched = BlendSchedule([5, 3, 2])
    for n in [0, 1, 7, 100, 12_345, 10**9 + 3, 10**15 + 1]:
        counts = sched.counts_before(n)
        assert counts.sum() == n
        assert np.all(np.abs(counts - np.array(WEIGHTS) * n) <= 1.5)


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.7, 0.1, 0.1, 0.05, 0.05], [3]])
def test_schedule_jumps_agree_with_sequence(weights):
    sched = BlendSchedule(weights)
    cids, local = sched.assign(0, 3000)
    for c in range(len(weights)):  # corpus-local indices run 0, 1, 2, ... in order
        np.testing.assert_array_equal(local[cids == c], np.arange((cids == c).sum()))
    for start in [1, 17, 999, 2500]:  # any window computed directly equals the slice
        c2, l2 = sched.assign(start, 300)
        np.testing.assert_array_equal(c2, cids[start : start + 300])
        np.testing.assert_array_equal(l2, local[start : start + 300])
        np.testing.assert_array_equal(
            sched.counts_before(start), np.bincount(cids[:start], minlength=len(weights))
        )


def test_schedule_rejects_bad_weights():
    for bad in ([], [1, 0], [1, -1], [float("nan")]):
        with pytest.raises(ValueError):
            BlendSchedule(bad)


def test_loader_blend_proportions_over_10000_samples(corpora):
    paths, sizes = corpora
    loader = build_train_loader(list(zip(paths, WEIGHTS)), SEQ, 100, 1000, 0, 1, seed=7)
    ids = np.concatenate([sample_identity(next(loader)["input_ids"]) for _ in range(100)])
    tags = ids[:, 1]
    for c, w in enumerate(WEIGHTS):
        frac = (tags == c).mean()
        assert abs(frac - w) <= 0.02 * w, (c, frac, w)
        # Each corpus keeps its own epoch order: every full epoch of it is a permutation.
        local = ids[tags == c, 0]
        for e in range(len(local) // sizes[c]):
            assert sorted(local[e * sizes[c] : (e + 1) * sizes[c]].tolist()) == list(
                range(sizes[c])
            )


def test_blended_resume_at_other_dp(corpora):
    paths, _ = corpora
    spec = list(zip(paths, WEIGHTS))
    whole = build_train_loader(spec, SEQ, 20, 20, 0, 1, seed=3)
    ref = np.concatenate([sample_identity(next(whole)["input_ids"]) for _ in range(10)])
    a = build_train_loader(spec, SEQ, 20, 20, 0, 1, seed=3)
    first = np.concatenate([sample_identity(next(a)["input_ids"]) for _ in range(4)])
    ranks = [build_train_loader(spec, SEQ, 5, 20, r, 2, seed=3) for r in range(2)]
    for r in ranks:
        r.load_state_dict(a.state_dict())
    rest = []
    for _ in range(6):  # each step: rank 0's two micro batches, then rank 1's
        rest += [sample_identity(next(r)["input_ids"]) for r in ranks for _ in range(2)]
    np.testing.assert_array_equal(np.concatenate([first, *rest]), ref)


@pytest.mark.parametrize("workers", [0, 2])
def test_valid_loader_is_deterministic_and_split(corpora, workers):
    paths, _ = corpora
    spec = list(zip(paths, WEIGHTS))
    single = build_valid_loader(spec, SEQ, 4, 0, 1, num_samples=24)
    whole = np.concatenate([sample_identity(b["input_ids"]) for b in single])
    assert np.all(whole[:, 2] == 1)  # only valid-split samples
    assert set(whole[:, 1].tolist()) == {0, 1, 2}  # every corpus is evaluated
    ranks = [build_valid_loader(spec, SEQ, 2, r, 2, 24, num_workers=workers) for r in range(2)]
    passes = [[sample_identity(b["input_ids"]) for b in v] for v in ranks]
    assert all(len(p) == 6 for p in passes) and len(ranks[0]) == 6
    # Micro step t: rank 0's 2 samples then rank 1's; 6 global micro steps of 4 = 24 samples.
    merged = np.concatenate([np.concatenate([passes[0][t], passes[1][t]]) for t in range(6)])
    expect = build_valid_loader(spec, SEQ, 24, 0, 1, 24)
    np.testing.assert_array_equal(merged, sample_identity(next(iter(expect))["input_ids"]))
    again = [[sample_identity(b["input_ids"]) for b in v] for v in ranks]  # restartable
    np.testing.assert_array_equal(np.stack(passes[1]), np.stack(again[1]))
    assert len(single) == 6 and whole.shape == (24, 3)


@pytest.mark.parametrize(("micro", "dp"), [(1, 1), (4, 1), (3, 2), (2, 4), (5, 3)])
def test_valid_set_is_the_same_samples_at_every_layout(corpora, micro, dp):
    """num_samples counts samples, not micro batches: at every (micro batch, DP) the labelled
    rows are exactly global indices [0, 21), each once; the ragged tail is label-masked."""
    from zenlm.data.loader import IGNORE_INDEX
    from zenlm.model.factory import IGNORE_INDEX as MODEL_IGNORE_INDEX

    assert IGNORE_INDEX == MODEL_IGNORE_INDEX
    paths, _ = corpora
    spec = list(zip(paths, WEIGHTS))
    n = 21
    (reference,) = build_valid_loader(spec, SEQ, n, 0, 1, n)
    ranks = [build_valid_loader(spec, SEQ, micro, r, dp, n) for r in range(dp)]
    assert len({len(v) for v in ranks}) == 1  # every rank runs the same number of batches
    counted, masked_tokens = [], 0
    for v in ranks:
        for b in v:
            keep = (b["labels"] != IGNORE_INDEX).all(dim=1)
            assert bool(((b["labels"] == IGNORE_INDEX).all(dim=1) | keep).all())
            counted.append(b["input_ids"][keep])
            masked_tokens += int((~keep).sum()) * SEQ
    got = np.concatenate([sample_identity(x) for x in counted])
    want = sample_identity(reference["input_ids"])
    order = np.lexsort(got.T[::-1])
    np.testing.assert_array_equal(got[order], want[np.lexsort(want.T[::-1])])
    assert masked_tokens == (len(ranks[0]) * micro * dp - n) * SEQ
