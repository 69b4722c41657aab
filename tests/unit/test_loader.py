"""The training loader's global order: exactly once per epoch, exact resume, resume at another DP size.

DP ranks are simulated in one process (the loader takes dp_rank/dp_size as arguments); workers
> 0 use a real torch DataLoader with forked worker processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from zenlm.data import build_train_loader
from zenlm.testing.corpus import sample_identity, sample_tokens, write_corpus

SEQ = 16
SHARDS = [50, 13, 40, 27, 35, 45, 31]  # 241 samples, uneven, 7 shards: not divisible by D*W
N = sum(SHARDS)
GB, MBS, SEED = 16, 2, 1234


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "c"
    write_corpus(path, SHARDS, seq_len=SEQ)
    return path


def make(corpus, rank, dp, workers=0, gb=GB, mbs=MBS):
    return build_train_loader([(corpus, 1.0)], SEQ, mbs, gb, rank, dp, workers, SEED)


def run_global(corpus, dp, workers, steps, state=None, gb=GB, mbs=MBS):
    """Run every rank for `steps` steps; return the sample ids in global order and rank 0's state."""
    out = np.full((steps, gb), -1, np.int64)
    per_rank, states = gb // dp, []
    for r in range(dp):
        loader = make(corpus, r, dp, workers, gb, mbs)
        if state is not None:
            loader.load_state_dict(state)
        for s in range(steps):
            for a in range(per_rank // mbs):
                ids = sample_identity(next(loader)["input_ids"])[:, 0]
                out[s, r * per_rank + a * mbs : r * per_rank + (a + 1) * mbs] = ids
        states.append(loader.state_dict())
        loader.close()
    assert all(s == states[0] for s in states)  # every rank reports the same position
    return out.reshape(-1), states[0]


@pytest.fixture(scope="module")
def reference(corpus):
    """The uninterrupted DP=1 order over 3 epochs' worth of steps."""
    return run_global(corpus, 1, 0, steps=-(-3 * N // GB))[0]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("dp", [1, 2, 4])
def test_exactly_once_per_epoch(corpus, reference, dp, workers):
    steps = -(-N // GB)  # 16 steps = 256 samples: epoch 0 and the start of epoch 1
    ids, state = run_global(corpus, dp, workers, steps)
    assert sorted(ids[:N].tolist()) == list(range(N))  # epoch 0: every sample exactly once
    assert len(set(ids[N:].tolist())) == len(ids) - N  # epoch 1 begins without repeats
    np.testing.assert_array_equal(ids, reference[: len(ids)])  # same order at every DP x W
    assert state["consumed_samples"] == steps * GB


def test_every_epoch_is_a_permutation_and_epochs_differ(reference):
    epochs = [reference[e * N : (e + 1) * N] for e in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(N))
    assert not np.array_equal(epochs[0], epochs[1])


def test_order_depends_on_seed(corpus, reference):
    other = build_train_loader([(corpus, 1.0)], SEQ, GB, GB, 0, 1, seed=SEED + 1)
    assert not np.array_equal(sample_identity(next(other)["input_ids"])[:, 0], reference[:GB])


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_k_steps(corpus, reference, workers):
    k, more = 5, 4
    first, state = run_global(corpus, 2, workers, k)
    state = json.loads(json.dumps(state))  # checkpoints store it as plain data
    assert state["consumed_samples"] == k * GB
    second, _ = run_global(corpus, 2, workers, more, state=state)
    np.testing.assert_array_equal(np.concatenate([first, second]), reference[: (k + more) * GB])


def test_resume_mid_step_same_layout(corpus, reference):
    loader = make(corpus, 1, 2)  # rank 1 of 2: 4 micro batches per step
    for _ in range(6):  # one step and a half
        next(loader)
    state = loader.state_dict()
    assert state["consumed_samples"] == GB and state["micro_batches_in_step"] == 2
    resumed = make(corpus, 1, 2)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(next(resumed)["input_ids"], next(loader)["input_ids"])
    with pytest.raises(ValueError, match="mid-step"):
        make(corpus, 0, 4).load_state_dict(state)


@pytest.mark.parametrize("new_dp", [4, 1])
def test_resume_at_other_dp_size(corpus, reference, new_dp):
    k, more = 3, 5
    first, state = run_global(corpus, 2, 0, k)
    second, _ = run_global(corpus, new_dp, 0, more, state=state)
    np.testing.assert_array_equal(np.concatenate([first, second]), reference[: (k + more) * GB])


def test_resume_with_larger_global_batch(corpus, reference):
    first, state = run_global(corpus, 2, 0, 3)
    second, _ = run_global(corpus, 4, 0, 2, state=state, gb=2 * GB)  # batch-size ramp-up
    np.testing.assert_array_equal(np.concatenate([first, second]), reference[: 7 * GB])


def test_state_refuses_other_seed_or_corpus(corpus, tmp_path):
    state = make(corpus, 0, 1).state_dict()
    other_seed = build_train_loader([(corpus, 1.0)], SEQ, MBS, GB, 0, 1, seed=SEED + 1)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)
    write_corpus(tmp_path / "d", [10, 10], seq_len=SEQ)
    with pytest.raises(ValueError, match="corpora"):
        build_train_loader([(tmp_path / "d", 1.0)], SEQ, MBS, GB, 0, 1, seed=SEED).load_state_dict(
            state
        )


def test_batch_contents(corpus):
    batch = next(make(corpus, 0, 1, mbs=GB))
    assert {k: (str(v.dtype), tuple(v.shape)) for k, v in batch.items()} == {
        "input_ids": ("torch.int64", (GB, SEQ)),
        "labels": ("torch.int64", (GB, SEQ)),
        "position_ids": ("torch.int64", (GB, SEQ)),
        "doc_ids": ("torch.int32", (GB, SEQ)),
    }
    assert batch["doc_ids"].max() > 0  # the corpus has document boundaries to check
    for row, index in enumerate(sample_identity(batch["input_ids"])[:, 0]):
        tokens, starts = sample_tokens("train", int(index), SEQ, 0, 1000)
        np.testing.assert_array_equal(batch["input_ids"][row], tokens[:-1])
        np.testing.assert_array_equal(batch["labels"][row], tokens[1:])
        pos, doc = np.zeros(SEQ, np.int64), np.zeros(SEQ, np.int64)
        for t in range(1, SEQ):  # naive reference: restart at every listed start < SEQ
            new = t in set(starts.tolist())
            pos[t] = 0 if new else pos[t - 1] + 1
            doc[t] = doc[t - 1] + new
        np.testing.assert_array_equal(batch["position_ids"][row], pos)
        np.testing.assert_array_equal(batch["doc_ids"][row], doc)


def test_argument_checks(corpus):
    with pytest.raises(ValueError, match="multiple"):
        make(corpus, 0, 2, gb=6, mbs=2)
    with pytest.raises(ValueError, match="dp_rank"):
        make(corpus, 2, 2)
