"""run_tool: a ZenlmError is one `error:` line and exit 2, printed once under torchrun; a bug
keeps its traceback. Every error class zenlm raises on purpose is a ZenlmError."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, IterableDataset

from zenlm.checkpoint.compat import IncompatibleCheckpointError
from zenlm.checkpoint.faults import TrainingDivergedError
from zenlm.checkpoint.io import CheckpointError
from zenlm.config.load import ConfigError
from zenlm.data.format import CorpusError
from zenlm.data.readers import BadInputError
from zenlm.errors import ZenlmError
from zenlm.runtime.cli import run_tool


@pytest.mark.parametrize(
    "cls",
    [ConfigError, CorpusError, BadInputError, CheckpointError, IncompatibleCheckpointError,
     TrainingDivergedError],
)  # fmt: skip
def test_every_purposeful_error_is_one_line_exit_2(cls, capsys, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)

    def body() -> int:
        raise cls("corpus/train-000001.tar: bad\nsecond line")

    assert issubclass(cls, ZenlmError)
    assert run_tool(body) == 2
    err = capsys.readouterr().err
    assert err == "error: corpus/train-000001.tar: bad; second line\n"


def test_a_bug_keeps_its_traceback() -> None:
    def body() -> int:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        run_tool(body)


def test_success_returns_the_body_code() -> None:
    assert run_tool(lambda: None) == 0
    assert run_tool(lambda: 3) == 3


def test_shared_errors_print_on_rank_0_only(capsys, monkeypatch) -> None:
    def shared() -> int:
        e = ConfigError("optim.lr must be > 0")
        e.same_on_all_ranks = True
        raise e

    def own() -> int:
        raise CorpusError("shard x: corrupt")

    monkeypatch.setenv("RANK", "3")
    assert run_tool(shared) == 2
    assert capsys.readouterr().err == ""
    assert run_tool(own) == 2
    assert capsys.readouterr().err == "[rank 3] error: shard x: corrupt\n"
    monkeypatch.setenv("RANK", "0")
    assert run_tool(shared) == 2
    assert capsys.readouterr().err == "error: optim.lr must be > 0\n"


class _BadShard(IterableDataset):
    def __iter__(self):
        raise CorpusError("/c/train-000001.tar: token id >= vocab_size 384 (corrupt data)")


def test_dataloader_worker_error_shows_the_original_message(capsys, monkeypatch) -> None:
    """torch re-raises a worker's error with the worker traceback in its message."""
    monkeypatch.delenv("RANK", raising=False)

    def body() -> int:
        next(iter(DataLoader(_BadShard(), num_workers=1, batch_size=None)))
        return 0

    assert run_tool(body) == 2
    err = capsys.readouterr().err
    assert err == "error: /c/train-000001.tar: token id >= vocab_size 384 (corrupt data)\n"
