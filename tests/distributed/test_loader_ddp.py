"""The loader under a real gloo process group: ranks from torch.distributed, disjoint global order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from zenlm.data import build_train_loader
from zenlm.testing.corpus import sample_identity, write_corpus
from zenlm.testing.distributed import run_distributed

SEQ, MBS, GB, STEPS, SEED = 16, 2, 8, 6, 99
SHARDS = [9, 14, 5]  # 3 uneven shards for 2 ranks: a shard-level split would give unequal counts
# One DataLoader worker per rank: the ranks are spawned, so their workers are spawned too (the
# dataset is pickled, fds are not inherited), which tests that path; 2 spawned workers per rank
# would cost ~10 s more here, and the W=2 round robin is covered by tests/unit/test_loader.py.
WORKERS = 1


def _rank_fn(rank: int, world_size: int, corpus: str) -> list[int]:
    loader = build_train_loader(
        [(corpus, 1.0)], SEQ, MBS, GB, dist.get_rank(), dist.get_world_size(), WORKERS, SEED
    )
    ids = []
    for _ in range(STEPS * GB // (MBS * world_size)):
        ids.append(torch.from_numpy(sample_identity(next(loader)["input_ids"])[:, 0]))
    loader.close()
    mine = torch.cat(ids)  # (STEPS * GB / world,) this rank's samples in its order
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)  # equal sizes on every rank, or this would hang
    per_rank = GB // world_size
    steps = [
        torch.cat([g[s * per_rank : (s + 1) * per_rank] for g in gathered]) for s in range(STEPS)
    ]
    return torch.cat(steps).tolist()


@pytest.mark.slow
def test_two_ranks_share_one_global_order(tmp_path):
    corpus = tmp_path / "c"
    write_corpus(corpus, SHARDS, seq_len=SEQ)
    results = run_distributed(_rank_fn, 2, args=(str(corpus),), timeout_s=120)
    assert results[0] == results[1]  # all_gather: every rank sees the same global sequence
    single = build_train_loader([(corpus, 1.0)], SEQ, GB, GB, 0, 1, 0, SEED)
    expect = np.concatenate(
        [sample_identity(next(single)["input_ids"])[:, 0] for _ in range(STEPS)]
    )
    np.testing.assert_array_equal(results[0], expect)
    n = sum(SHARDS)  # 28 samples: the first 28 of 48 are one epoch, each sample exactly once
    assert sorted(results[0][:n]) == list(range(n))
