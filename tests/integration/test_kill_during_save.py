"""kill -9 inside the real multi-rank save, 20 points in all: the previous checkpoint stays intact,
the newest complete checkpoint is the one the relaunch resumes from, and the relaunched run's
losses and grad norms equal the uninterrupted run's bitwise.

The path is the user's: a corpus written by tools/train_tokenizer.py and tools/preprocess.py,
every rank running launch/train.py unchanged (configs/debug.yaml plus overrides, `Trainer(cfg)`
with zenlm's own loader) in the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT), saving
through CheckpointSession.save at every step. Two layouts: 2 ranks at DP 2 (ZeRO-1: every rank
writes a model and an optimizer file, gathered over DP) and 4 ranks at TP 2 x PP 2 (two pipeline
stages, gathered over TP, four writers). Ranks are forked from a server process that imported
zenlm.train.trainer once (multiprocessing's forkserver) instead of starting a fresh interpreter:
that removes ~6 s of imports per rank and launch, nothing else (tests/integration/_kill_rank.py).
data.num_workers is 0 here: the loader's state with workers is checked by
tests/distributed/test_checkpoint_resume.py, this test is about the save protocol.

The kill: _kill_rank.py observes, on each rank during the save, every file the checkpoint code
writes (byte by byte), every fsync, mkdir, rename, replace and rmtree, and the entry and exit of
save(); each is an event with a stable key. At the planned event the rank writes the planned
prefix of the file (a torn file), then SIGKILLs its process group (itself and any DataLoader
workers: a node or job-step loss). The survivors see the closed connection in their next
collective and exit non-zero.

How the 20 kill points are chosen (10 per layout), and why that is enough:
- An uninterrupted baseline run records each rank's event list for every step's save. Every
  event is put in one phase of the protocol (docs/checkpoints.md, Save): `begin` (save entered,
  checkpoint and temp dirs created), `tensors` (model / optimizer safetensors, every rank),
  `rng` (every rank), `metadata` (rank 0's trainer.json, config.yaml, meta.json), `commit`
  (temp-dir fsync, rename to step_N, parent fsync), `latest` (write, fsync, replace, fsync),
  `prune` (rename of the oldest checkpoint to .trash, fsync, removal) and `end` (save returned).
- Per layout the ten points cover every phase once plus two more in `tensors` (where nearly all
  bytes are), in an order shuffled by random.Random(f"{SEED}/{world_size}"). Within a phase the
  rank is a seeded choice among the ranks that have events there and the event a seeded choice
  among that rank's; in `tensors` only file writes are candidates, with a seeded byte offset in
  [0, file size) (other phases draw writes, fsyncs and renames alike, and offsets for writes).
- The runs form a chain: each launch is the same command (resume=auto, as a requeue would run
  it), trains two steps past the checkpoint it resumed (so it saves once completely, then is
  killed in its second save), and is killed at the next point. The next launch is both the
  check of that kill's resume and the carrier of the next kill; a last launch runs to the end.
- Which checkpoint must survive depends only on where a kill falls relative to the two commit
  points (the rename of the temp dir, then `latest`) and whether a file is torn; every phase,
  hence every on-disk state the protocol can leave, is hit at both layouts, on rank 0 and on
  other ranks, including torn model and optimizer files at random offsets. A time-based kill
  (tests/unit/test_checkpoint_store.py) mostly lands in the big writes; this one is spread by
  construction and replays exactly: every point is in the failure messages and printed.

Checked after each kill: the planned rank died at the planned event; the others exited non-zero
(no hang) within the timeout; the previous checkpoint verifies and its files equal the
baseline's of that step; every step_* directory verifies (no half-deleted or half-written one);
the newest complete checkpoint is the previous one, or the new one exactly when the kill came
after its rename; the next launch resumes from that one (its own record of resume()) and its
losses and grad norms equal the baseline's bitwise (CPU fp32, same layout). The last launch
finishes with exit code 0 and a final checkpoint whose files equal the baseline's.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import multiprocessing.forkserver
import os
import random
import runpy
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from zenlm.checkpoint import CheckpointStore, newest_valid, verify
from zenlm.testing.distributed import cpu_env, free_port
from zenlm.testing.text_corpus import build_text_corpus

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "debug.yaml")
HELPER = str(Path(__file__).with_name("_kill_rank.py"))
SEED = 1128
STEPS = 22  # 10 kills advance the chain by at most 2 steps each
PHASES = ["begin", "tensors", "tensors", "tensors", "rng", "metadata", "commit", "latest"]
PHASES += ["prune", "end"]
BASE = [
    f"optim.train_steps={STEPS}",
    "optim.warmup_steps=2",
    "optim.lr=0.003",
    "optim.min_lr=0.0003",
    "optim.grad_clip_norm=0.5",
    "data.global_batch_size_seqs=8",
    "data.micro_batch_size_seqs=2",
    "data.num_workers=0",
    "logging.eval_interval_steps=0",
    "logging.log_interval_steps=1",
    "logging.tensorboard_enabled=false",
    "checkpoint.save_interval_steps=1",
    "checkpoint.keep_last=3",
    "runtime.dist_timeout_s=60",
]
LAYOUTS = {
    2: ["parallel.zero_stage=1"],  # DP 2
    4: ["parallel.tensor_parallel_degree=2", "parallel.pipeline_parallel_degree=2"],
}


@dataclass
class Launch:
    out_dir: Path
    exitcodes: list[int | None]
    events: list[list[dict]]

    def tail(self, n: int = 2500) -> str:
        logs = sorted(self.out_dir.glob("rank*.log"))
        return "\n".join(f"--- {p.name}\n{p.read_text()[-n:]}" for p in logs)

    def of(self, rank: int, ev: str) -> list[dict]:
        return [e for e in self.events[rank] if e["ev"] == ev]

    def losses(self) -> dict[int, tuple[float, float]]:
        """step -> (loss, grad norm), the same on every rank (asserted)."""
        per_rank = [
            {e["step"]: (e["loss"], e["grad_norm"]) for e in self.of(r, "loss")}
            for r in range(len(self.events))
        ]
        assert all(p == per_rank[0] for p in per_rank), "ranks disagree on loss / grad norm"
        return per_rank[0]

    def resumed(self) -> str | None:
        (rec,) = self.of(0, "resumed")
        return rec["path"]

    def save_events(self, step: int) -> dict[int, list[dict]]:
        return {
            r: _phases([e for e in self.of(r, "point") if e["step"] == step])
            for r in range(len(self.events))
        }


def _phases(events: list[dict]) -> list[dict]:
    """Label each save event of one rank with its protocol phase (module docstring)."""
    phase = "begin"
    for e in events:
        kind, name = e["kind"], e["name"]
        if kind == "end":
            phase = "end"
        elif name.startswith(("model-", "optim-")):
            phase = "tensors"
        elif name.startswith("rng-"):
            phase = "rng"
        elif name in ("trainer.json", "config.yaml", "meta.json"):
            phase = "metadata"
        elif name.startswith(".tmp.") and kind in ("fsync", "rename"):
            phase = "commit"
        elif name.startswith(".latest"):
            phase = "latest"
        elif ".trash." in name and phase != "begin":  # begin's stale-trash removal stays begin
            phase = "prune"
        # anything else (fsync of the checkpoints dir, mkdir, stale rmtree) continues the phase
        e["phase"] = phase
    return events


def _choose(rng: random.Random, queue: list[str], events: dict[int, list[dict]]) -> dict:
    """The next kill point: the first phase in `queue` this save has, a rank, an event, an offset."""

    def candidates(phase: str, evs: list[dict]) -> list[dict]:
        picked = [e for e in evs if e["phase"] == phase]
        return [e for e in picked if e["kind"] == "write"] if phase == "tensors" else picked

    usable = [p for p in queue if any(candidates(p, evs) for evs in events.values())]
    assert usable, f"no save event in any of the phases {queue}"
    phase = usable[0]
    queue.remove(phase)
    ranks = [r for r in sorted(events) if candidates(phase, events[r])]
    rank = rng.choice(ranks)
    e = rng.choice(candidates(phase, events[rank]))
    kill = {"rank": rank, "step": e["step"], "kind": e["kind"], "name": e["name"], "n": e["n"]}
    if e["kind"] == "write":
        kill["offset"] = rng.randrange(e["bytes"])
    return {**kill, "phase": phase}


def _read_events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _launch(ctx, world_size, argv, out_dir, kill=None, timeout_s=150) -> Launch:
    out_dir.mkdir(parents=True)
    port = free_port()
    # gloo CPU ranks unless there is a GPU for each (the forked ranks take os.environ as it is)
    env = {k: v for k, v in cpu_env(world_size).items() if os.environ.get(k) != v}
    procs = []
    for rank in range(world_size):
        params = {
            "env": env,
            "rank": rank,
            "world_size": world_size,
            "port": port,
            "argv": ["--config", CONFIG, *argv],
            "out_dir": str(out_dir),
            "kill": kill if kill is not None and kill["rank"] == rank else None,
        }
        kwargs = {"init_globals": {"PARAMS": params}, "run_name": "__zenlm_rank__"}
        proc = ctx.Process(target=runpy.run_path, args=(HELPER,), kwargs=kwargs)
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    exitcodes = [proc.exitcode for proc in procs]
    for proc in procs:  # each rank leads a process group: end it and anything left in it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.join()
    events = [_read_events(out_dir / f"events{r}.jsonl") for r in range(world_size)]
    return Launch(out_dir, exitcodes, events)


def _same_files(got: dict, want: dict) -> bool:
    """meta.json file records equal (CRC-32 and size) for the model, optimizer, RNG and trainer
    state. Not compared: config.yaml (run_name differs)."""

    def kept(files: dict) -> dict:
        return {k: v for k, v in files.items() if k != "config.yaml"}

    return kept(got) == kept(want)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_text_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ctx():
    """Rank processes forked from one server that has imported the training stack."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["zenlm.train.trainer"])
    with pytest.MonkeyPatch.context() as patch:
        # The server imports torch before any rank sets its environment: give it CPU-only
        # settings from the start where the ranks will need them (more ranks than GPUs).
        for key, value in cpu_env(max(LAYOUTS)).items():
            if os.environ.get(key) != value:
                patch.setenv(key, value)
        yield context
        multiprocessing.forkserver._forkserver._stop()


@pytest.mark.parametrize("world_size", [2, 4])
def test_kill_during_real_save(ctx, corpus, tmp_path, world_size):
    common = [*BASE, *LAYOUTS[world_size], *corpus.overrides(), f"logging.run_dir={tmp_path}"]
    base = _launch(ctx, world_size, [*common, "logging.run_name=straight"], tmp_path / "base")
    assert base.exitcodes == [0] * world_size, base.tail()
    want = base.losses()
    assert sorted(want) == list(range(1, STEPS + 1))
    assert want[STEPS][0] < want[1][0] - 0.05, "the run does not train"
    saved = {e["step"]: e["files"] for e in base.of(0, "saved")}
    assert sorted(saved) == list(range(1, STEPS + 1))

    store = CheckpointStore(tmp_path / "chain" / "checkpoints")
    chain = [*common, "logging.run_name=chain"]
    rng = random.Random(f"{SEED}/{world_size}")
    queue = PHASES[:]
    rng.shuffle(queue)
    points: list[dict] = []
    committed = 0  # the newest complete checkpoint of the chain (0: none yet)
    while queue:
        step = committed + 2
        kill = _choose(rng, queue, base.save_events(step))
        points.append(kill)
        print(f"kill point {len(points)} at {world_size} ranks: {kill}")
        run = _launch(ctx, world_size, chain, tmp_path / f"kill{len(points):02d}", kill)
        what = f"kill point {len(points)} of {points}"

        # this launch resumed from the previous kill's survivor and trained like the baseline
        want_resume = str(store.path(committed)) if committed else None
        assert run.resumed() == want_resume, f"{what}: resumed {run.resumed()}\n{run.tail()}"
        assert run.losses() == {s: want[s] for s in range(committed + 1, step + 1)}, what
        # the kill happened where planned; nobody hung, nobody else exited 0
        assert run.of(kill["rank"], "kill") == [{"ev": "kill", **kill}], f"{what}\n{run.tail()}"
        assert run.exitcodes[kill["rank"]] == -signal.SIGKILL, f"{what}: {run.exitcodes}"
        others = [c for r, c in enumerate(run.exitcodes) if r != kill["rank"]]
        assert all(c is not None and c != 0 for c in others), f"{what}: {run.exitcodes}"

        # what is on disk
        prev = step - 1  # saved completely by this launch (or resumed from, at the start)
        meta = verify(store.path(prev))
        assert _same_files(meta["files"], saved[prev]), f"{what}: step {prev} differs"
        for s in store.steps():
            verify(store.path(s))  # raises for a torn, partial or half-deleted checkpoint
        rename = f".tmp.{store.path(step).name}>{store.path(step).name}"
        renamed = any(
            e["kind"] == "rename" and e["name"] == rename for e in run.of(0, "point")
        ) and not (kill["rank"] == 0 and kill["kind"] == "rename" and kill["name"] == rename)
        committed = step if renamed else prev
        chosen = newest_valid(store)
        assert chosen is not None and chosen[0] == store.path(committed), (
            f"{what}: chose {chosen and chosen[0]}, expected step {committed}"
        )
        if renamed:
            assert _same_files(chosen[1]["files"], saved[step]), f"{what}: step {step} differs"

    last = _launch(ctx, world_size, chain, tmp_path / "last")
    what = f"last launch after {points}"
    assert last.exitcodes == [0] * world_size, f"{what}\n{last.tail()}"
    assert last.resumed() == str(store.path(committed)), what
    assert last.losses() == {s: want[s] for s in range(committed + 1, STEPS + 1)}, what
    assert _same_files(verify(store.path(STEPS))["files"], saved[STEPS]), what
    phases = sorted({p["phase"] for p in points})
    assert phases == sorted(set(PHASES)), f"phases not all covered: {phases}"
    assert len({p["rank"] for p in points}) > 1, "every kill landed on one rank"
