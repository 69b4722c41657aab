"""The checkpoint directory protocol, without DeepSpeed: atomic commit, retention, verification,
kill -9 during a save (20 random kill points), a full disk, and planted pickles.

`_save` performs the same sequence as CheckpointSession.save (begin -> every file through
io.write_* -> store.commit, which writes meta.json last and renames -> prune), with tensors
whose values encode the step so a test can tell which save a directory came from.
"""

import errno
import os
import pickle
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from zenlm.checkpoint.io import (
    CheckpointError,
    read_tensors,
    safe_torch_load,
    write_json,
    write_tensors,
)
from zenlm.checkpoint.store import (
    CheckpointStore,
    file_records,
    newest_valid,
    read_meta,
    verify,
)
from zenlm.checkpoint.weights import _Reader


def _save(store: CheckpointStore, step: int, numel: int = 1 << 16, keep_last: int = 2):
    tmp = store.begin(step)
    files = {
        f"model-p0-w{w}.safetensors": write_tensors(
            tmp / f"model-p0-w{w}.safetensors", {"w": torch.full((numel,), float(step))}
        )
        for w in range(2)
    }
    files["trainer.json"] = write_json(tmp / "trainer.json", {"step": step})
    final = store.commit(step, files, {"tokens_seen": step * 10})
    store.prune(keep_last)
    return final


def _step_of(path: Path) -> int:
    meta = verify(path)
    for name in meta["files"]:
        if name.startswith("model-"):
            assert read_tensors(path / name, file_records(meta)[name])["w"][0] == meta["step"]
    return meta["step"]


def test_commit_writes_meta_last_and_latest(tmp_path):
    store = CheckpointStore(tmp_path)
    final = _save(store, 7)
    assert final.name == "step_00000007" and store.latest_hint() == "step_00000007"
    meta = read_meta(final)
    assert meta["step"] == 7 and meta["tokens_seen"] == 70
    assert set(meta["files"]) == {
        "model-p0-w0.safetensors",
        "model-p0-w1.safetensors",
        "trainer.json",
    }
    assert not list(tmp_path.glob(".tmp.*"))
    assert _step_of(final) == 7


def test_keep_last_and_keep_every(tmp_path):
    store = CheckpointStore(tmp_path)
    for step in range(1, 11):
        _save(store, step, numel=4, keep_last=100)
    store.prune(keep_last=2, keep_every_steps=4)
    assert store.steps() == [10, 9, 8, 4]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "meta"])
def test_damaged_checkpoint_is_never_chosen(tmp_path, damage):
    store = CheckpointStore(tmp_path)
    _save(store, 1)
    newest = _save(store, 2)
    target = newest / ("meta.json" if damage == "meta" else "model-p0-w1.safetensors")
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text('{"format": "zenlm-chec')
    with pytest.raises(CheckpointError):
        verify(newest)
    path, meta = newest_valid(store)
    assert path.name == "step_00000001" and meta["step"] == 1


def _saver(root: Path, start: int, out_fd: int) -> None:
    """Forked child: save step after step, reporting each completed one on the pipe."""
    store = CheckpointStore(root)
    step = start
    while True:
        _save(store, step, numel=1 << 18)  # ~2 MB per checkpoint: most time is inside a save
        os.write(out_fd, f"{step}\n".encode())
        step += 1


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_kill_during_save_20_random_points(tmp_path):
    """SIGKILL a saving process at 20 random moments: the newest complete checkpoint is intact,
    is the last reported one (or the one whose rename had just happened), and is chosen.
    The saver is forked (torch already imported) so each trial costs milliseconds to start."""
    rng = random.Random(1234)
    root = tmp_path / "ckpt"
    reported, mid_save = 0, 0
    for trial in range(20):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns, killed below
            os.close(r)
            try:
                _saver(root, reported + 1, w)
            finally:
                os._exit(1)
        os.close(w)
        first = b""
        while not first.endswith(b"\n"):  # one save done: now kill at a random moment
            first += os.read(r, 1)
        time.sleep(rng.uniform(0.0, 0.2))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"trial {trial}: saver exited by itself ({status})"
        done = [int(x) for x in (first.decode() + _read_all(r)).split()]
        os.close(r)
        reported = max(reported, *done)
        mid_save += any(root.glob(".tmp.*"))  # killed with a save's files half written
        chosen = newest_valid(CheckpointStore(root))
        assert chosen is not None, f"trial {trial}: no complete checkpoint left"
        step = _step_of(chosen[0])
        # Killed after the rename but before the report: one newer than reported is complete too.
        assert step in (reported, reported + 1), f"trial {trial}: chose {step}, reported {reported}"
        reported = step
    assert mid_save >= 10, f"only {mid_save} of 20 kills landed inside a save"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
    except FileNotFoundError:
        return False
    return r.returncode == 0


def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch):
    """A real 3 MB tmpfs when mount works (root in this sandbox); else write() fails with ENOSPC."""
    root = tmp_path / "small"
    mounted = _mount_tmpfs(root, "3m")
    try:
        store = CheckpointStore(root)
        _save(store, 1, numel=1 << 18)  # ~2 MB: fits once, not twice
        if not mounted:
            real_open = open

            def full_open(file, mode="r", *a, **k):
                f = real_open(file, mode, *a, **k)
                if "w" in mode and ".tmp." in str(file):

                    def write(_data):
                        raise OSError(errno.ENOSPC, "No space left on device")

                    f.write = write
                return f

            monkeypatch.setattr("builtins.open", full_open)
        with pytest.raises(CheckpointError, match="disk full"):
            _save(store, 2, numel=1 << 18)
        monkeypatch.undo()
        path, meta = newest_valid(store)
        assert meta["step"] == 1 and _step_of(path) == 1
        # The partial save is cleared by the next begin(), which then has room again.
        _save(store, 3, numel=4)
        assert store.steps()[0] == 3
    finally:
        if mounted:
            subprocess.run(["umount", str(root)], check=False)


class _Evil:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_is_refused_without_running(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt")
    final = _save(store, 1)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _Evil(str(marker))})
    target = final / "model-p0-w0.safetensors"
    target.write_bytes(evil)
    # Checksum check: the planted file does not match meta.json.
    with pytest.raises(CheckpointError):
        verify(final)
    assert newest_valid(store) is None
    # Even if meta.json were rewritten to match, the readers only parse safetensors.
    with pytest.raises(CheckpointError, match="safetensors"):
        read_tensors(target)
    with pytest.raises(CheckpointError):
        _Reader(final).get(target.name, "w")
    # And a foreign .pt file goes through torch.load(weights_only=True), which refuses it.
    pt = tmp_path / "model.pt"
    pt.write_bytes(evil)
    with pytest.raises(CheckpointError, match="refused"):
        safe_torch_load(pt)
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert safe_torch_load(tmp_path / "ok.pt")["w"].sum() == 2
    assert not marker.exists(), "unpickling ran code"


def test_protected_steps_are_neither_counted_nor_pruned_and_set_aside_keeps_bytes(tmp_path):
    """What the session uses for checkpoints it could not read (or did not read, resume=none)."""
    store = CheckpointStore(tmp_path)
    for step in (1, 2, 3):
        _save(store, step, numel=64, keep_last=0)
    before = {p.name: p.read_bytes() for p in store.path(3).iterdir()}
    _save(store, 4, numel=64, keep_last=0)
    assert store.prune(keep_last=1, protected={3}) == [2, 1]
    assert store.steps() == [4, 3]
    kept = store.set_aside(3)
    assert kept.name.startswith("step_00000003.kept-") and store.steps() == [4]
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before
    _save(store, 5, numel=64, keep_last=1)  # .kept- directories are outside discovery/pruning
    assert store.steps() == [5] and kept.is_dir()
