"""The Trainer's checkpointing: resume at start, save on schedule / request / at the end.

    session = CheckpointSession(trainer)   # after the engine and the data exist
    session.resume()                       # checkpoint.resume: auto | none | <path>
    ... each step: stop = session.after_step(loss, skipped)
    session.finish()                       # the final save

Every public method is collective (all ranks call it at the same point). Errors on one rank are
shared with the others before anyone raises, so a full disk or a torn file never leaves ranks
waiting for each other in a collective.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml
from safetensors import safe_open

import zenlm
from zenlm.checkpoint import runstate
from zenlm.checkpoint.compat import IncompatibleCheckpointError
from zenlm.checkpoint.faults import StepHealth, StopRequests, guard_plain_optimizer
from zenlm.checkpoint.io import CheckpointError, read_json, write_bytes, write_json, write_tensors
from zenlm.checkpoint.store import CheckpointStore, file_records, read_meta, verify_files
from zenlm.checkpoint.weights import load_weights, save_weights
from zenlm.config.load import to_dict
from zenlm.runtime.log import get_logger

log = get_logger()


def _all_errors(err: str | None) -> list[str]:
    """Every rank's error message (or None), gathered to all ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [err] if err else []
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, err)
    return [e for e in out if e]


_INCOMPATIBLE = "incompatible: "


def _as_message(e: CheckpointError) -> str:
    """A rank's error as a string that keeps its kind across all_gather_object."""
    return (_INCOMPATIBLE if isinstance(e, IncompatibleCheckpointError) else "") + str(e)


def _raise_gathered(errors: list[str]) -> None:
    """Raise the first gathered error, incompatible ones first (they stop the run), on every rank."""
    if not errors:
        return
    bad_fit = [e for e in errors if e.startswith(_INCOMPATIBLE)]
    err: CheckpointError = (
        IncompatibleCheckpointError(bad_fit[0].removeprefix(_INCOMPATIBLE))
        if bad_fit
        else CheckpointError(errors[0])
    )
    err.same_on_all_ranks = True
    raise err


def _from_rank0(value: Any) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class CheckpointSession:
    def __init__(self, trainer: Any) -> None:
        self.t = trainer
        self.cfg = trainer.cfg.checkpoint
        root = self.cfg.dir or Path(trainer.run_dir) / "checkpoints"
        self.store = CheckpointStore(root)
        self.requests = StopRequests(Path(trainer.run_dir))
        self.health = StepHealth(
            self.cfg.max_consecutive_nonfinite_steps,
            self.cfg.loss_spike_factor,
            self.cfg.loss_spike_window_steps,
            fp16=trainer.cfg.runtime.precision == "fp16",
        )
        guard_plain_optimizer(trainer.engine)
        self.last_saved_step: int | None = None
        self.loaded_from: Path | None = None
        # Checkpoints this run did not read (unverifiable ones it skipped; every existing one
        # under resume=none): never pruned, and set aside rather than overwritten by a save.
        self.protected_steps: set[int] = set()
        self.bytes_read = 0  # tensor bytes this rank read at the last load (slices only)

    # -- what the trainer calls --------------------------------------------------------------

    def after_step(self, loss: float, skipped: bool) -> bool:
        """Health check, then any save that is due; True when the run must stop (signal)."""
        self.health.observe(self.t.step, loss, skipped)
        save_now, stop = self.requests.poll()
        every = self.cfg.save_interval_steps
        if save_now or (every and self.t.step % every == 0):
            self.save()
            if save_now and self.t.rank == 0:
                self.requests.consume_flag_file()
        if stop:
            log.info(
                f"stop requested (signal {self.requests.signal_received}) at step {self.t.step}"
            )
        return stop

    def stop_before_start(self) -> bool:
        """A stop signal received during set-up or resume (agreed by all ranks): stop before
        the first step. Nothing is saved: the state is the checkpoint just loaded, or none."""
        _, stop = self.requests.poll()
        if stop:
            log.info(
                f"stop requested (signal {self.requests.signal_received}) before the first step "
                f"(at step {self.t.step}): nothing new to save"
            )
        return stop

    def finish(self) -> None:
        if self.last_saved_step != self.t.step:
            self.save()

    def scalars(self) -> dict[str, float]:
        return {
            "train/nonfinite_steps": float(self.health.nonfinite_steps),
            "train/loss_spikes": float(self.health.spikes),
        }

    # -- save --------------------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        lay, c = self.t.layout, self.t.cfg
        return {
            "world_size": lay.world_size,
            "tensor_parallel_degree": lay.tensor_parallel_degree,
            "pipeline_parallel_degree": lay.pipeline_parallel_degree,
            "data_parallel_degree": lay.data_parallel_degree,
            "zero_stage": c.parallel.zero_stage,
            "precision": c.runtime.precision,
            "micro_batch_size_seqs": lay.micro_batch_size_seqs,
            "grad_accum_steps": lay.grad_accum_steps,
            "global_batch_size_seqs": lay.global_batch_size_seqs,
            "seq_len_tokens": lay.seq_len_tokens,
        }

    def _tokenizer_fingerprint(self) -> str | None:
        path = self.t.cfg.data.tokenizer_path
        if not path:
            return None
        from zenlm.data.tokenizer import fingerprint_file

        return fingerprint_file(path)

    def _tokenizer_ids(self) -> dict[str, Any] | None:
        """bos/eos/pad ids and the vocabulary of data.tokenizer_path (export writes them into
        generation_config.json), or None without a tokenizer."""
        path = self.t.cfg.data.tokenizer_path
        if not path:
            return None
        if not hasattr(self, "_tok_ids"):
            from zenlm.data.tokenizer import load_tokenizer

            tok = load_tokenizer(path)
            self._tok_ids = {
                "path": str(path),
                "vocab_size": tok.vocab_size,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
                "pad_id": tok.pad_id,
            }
        return self._tok_ids

    def _source(self) -> dict[str, Any] | None:
        """Where the weights came from (an imported model's family, ids, path), carried over from
        checkpoint.init_from or the resumed checkpoint, so export knows the family."""
        return getattr(self, "init_source", None)

    def save(self) -> Path:
        t, step, rank = self.t, self.t.step, self.t.rank
        start = time.perf_counter()
        err = None
        if rank == 0:
            try:
                self.store.begin(step)
            except OSError as e:
                err = f"cannot create {self.store.tmp_dir(step)}: {e}"
        err = _from_rank0(err)
        if err:
            raise CheckpointError(err)
        tmp = self.store.tmp_dir(step)
        result: tuple[dict, dict, dict] = ({}, {}, {})
        local_err = None
        try:
            result = save_weights(t.engine, t.factory, t.dims, tmp, rank)
            tensors, meta = runstate.rng_state()
            result[0][f"rng-r{rank:05d}.safetensors"] = write_tensors(
                tmp / f"rng-r{rank:05d}.safetensors", tensors, meta
            )
        except Exception as e:  # shared below, so no rank is left in a collective alone
            local_err = f"rank {rank}: {e}"
        errors = _all_errors(local_err)
        gathered: list[Any] = [result]
        if not errors and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, result)
        outcome: tuple[str | None, str | None] = (None, "; ".join(errors) or None)
        if rank == 0:
            outcome = self._commit(step, gathered) if not errors else outcome
            if outcome[1]:
                shutil.rmtree(tmp, ignore_errors=True)  # frees the partial save's space
        path, error = _from_rank0(outcome)
        if error:
            prev = self.store.steps()
            raise CheckpointError(
                f"checkpoint of step {step} failed: {error}. The previous checkpoint "
                f"({self.store.path(prev[0]) if prev else 'none'}) is intact."
            )
        self.last_saved_step = step
        log.info(f"saved checkpoint {path} in {time.perf_counter() - start:.1f} s")
        return Path(path)

    def _commit(self, step: int, gathered: list[Any]) -> tuple[str | None, str | None]:
        """Rank 0: trainer.json, config.yaml, meta.json, rename, latest, prune."""
        t = self.t
        try:
            tmp = self.store.tmp_dir(step)
            files: dict = {}
            index: dict[str, dict[str, str]] = {"model": {}, "optim": {}}
            shapes: dict[str, list[int]] = {}
            for recs, idx, shp in gathered:
                files.update(recs)
                for kind in index:
                    index[kind].update(idx.get(kind, {}))
                shapes.update(shp)
            loader = t.train_loader
            state = {
                "step": step,
                "tokens_seen": t.tokens_seen,
                "optimizer": runstate.optimizer_state(t.engine),
                "health": self.health.state_dict(),
                "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
            }
            files["trainer.json"] = write_json(tmp / "trainer.json", state)
            config_text = yaml.safe_dump(to_dict(t.cfg), sort_keys=False).encode()
            files["config.yaml"] = write_bytes(tmp / "config.yaml", config_text)
            meta = {
                "zenlm_version": zenlm.__version__,
                "created_unix": time.time(),
                "tokens_seen": t.tokens_seen,
                "layout": self._layout(),
                "tokenizer_fingerprint": self._tokenizer_fingerprint(),
                "tokenizer": self._tokenizer_ids(),
                "source": self._source(),
                "parameter_count": sum(_numel(s) for s in shapes.values()),
                "tensors": index,
                "shapes": dict(sorted(shapes.items())),
            }
            if step in self.protected_steps and self.store.path(step).exists():
                kept = self.store.set_aside(step)
                self.protected_steps.discard(step)
                log.warning(f"kept the unread checkpoint of step {step} as {kept}")
            final = self.store.commit(step, files, meta)
            pruned = self.store.prune(
                self.cfg.keep_last, self.cfg.keep_every_steps, self.protected_steps
            )
            for s in pruned:
                log.info(f"deleted old checkpoint step {s}")
            return str(final), None
        except Exception as e:
            return None, f"rank 0: {e}"

    # -- resume ------------------------------------------------------------------------------

    def _precheck(self, path: Path) -> dict[str, Any]:
        """meta.json parses and every listed file exists with its size (stat only; collective).
        This catches torn and partial checkpoints before any rank starts loading."""
        meta, err = None, None
        try:
            meta = read_meta(path)
            for name, rec in file_records(meta).items():
                f = path / name
                if not f.is_file() or f.stat().st_size != rec.bytes:
                    raise CheckpointError(f"{f} is missing or has the wrong size")
        except CheckpointError as e:
            err = _as_message(e)
        _raise_gathered(_all_errors(err))
        return meta  # type: ignore[return-value]

    def _load_verified(self, path: Path, meta: dict[str, Any]) -> None:
        """Load while a second thread checks the CRC-32 of this rank's share of the files (the
        ranks split them); if any rank finds a mismatch, every rank raises and the caller loads
        an older checkpoint, which overwrites everything loaded here."""
        self._verified(path, meta, lambda: self._load(path, meta))
        # Only now (verified on every rank) move the data stream: a fallback must not skip twice.
        try:
            self._restore_data(self._pending_data, self._pending_step)
        except ValueError as e:  # the loader's own check: another corpus set or batch layout
            raise IncompatibleCheckpointError(
                f"checkpoint {path}: its data position does not fit this run's corpora ({e}); "
                "resume with the corpora and seq_len it was trained on, or start another run"
            ) from e
        self.t.step = self._pending_step
        log.info(self._pending_message)

    def init_from(self, path: Path) -> None:
        """checkpoint.init_from: weights only (fresh optimizer, step 0, data from the start)."""
        start = time.perf_counter()
        meta = self._precheck(path)

        def load() -> None:
            self.bytes_read = load_weights(
                self.t.engine, self.t.factory, path, meta["tensors"], optimizer=False
            )

        self._verified(path, meta, load)
        self.init_source = meta.get("source")
        log.info(
            f"initialized weights from {path} (read {self.bytes_read / 2**20:.1f} MiB on "
            f"rank {self.t.rank}) in {time.perf_counter() - start:.1f} s"
        )

    def _verified(self, path: Path, meta: dict[str, Any], load: Any) -> None:
        """Run `load` while a second thread checks the CRC-32 of this rank's share of the files;
        raise on every rank (the gathered first error) if any rank failed."""
        records = file_records(meta)
        world = dist.get_world_size() if dist.is_initialized() else 1
        mine = sorted(records)[self.t.rank :: world]
        box: dict[str, str] = {}

        def check() -> None:
            # Two files at a time: one file's cold read overlaps the other's CRC, so the check
            # ends about when the load does (bench load ratio 0.47-0.52 -> 0.61-1.11).
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(verify_files, path, records, [n]) for n in mine]
                for fut in futures:
                    try:
                        fut.result()
                    except CheckpointError as e:
                        box.setdefault("err", str(e))

        checker = threading.Thread(target=check, daemon=True)
        checker.start()
        err = None
        try:
            load()
        except CheckpointError as e:
            err = _as_message(e)
        finally:
            checker.join()
        # A failed CRC makes the checkpoint corrupt whatever the load said (a flipped byte can
        # also change a shape in a header): corrupt ones are skipped, incompatible ones stop.
        _raise_gathered(_all_errors(box.get("err") or err))

    def resume(self) -> Path | None:
        """Load checkpoint.resume: 'none', one path, or 'auto' (the newest that verifies).

        auto skips a torn or corrupt checkpoint for an older one and keeps it on disk (never
        pruned, set aside rather than overwritten); a complete one that does not fit this run
        stops it (IncompatibleCheckpointError), and so does finding checkpoints of which none
        verifies: starting over would bury them. The user chooses checkpoint.resume=none."""
        choice = self.cfg.resume
        existing = self.store.steps()
        init_from = Path(self.cfg.init_from) if self.cfg.init_from else None
        if choice == "none":
            if existing:
                self.protected_steps = set(existing)
                log.warning(
                    f"checkpoint.resume=none: starting from step 0; the {len(existing)} "
                    f"checkpoints already in {self.store.root} (steps {sorted(existing)}) are "
                    "kept: never pruned, set aside rather than overwritten"
                )
            if init_from:
                self.init_from(init_from)
            return None
        explicit = choice != "auto"
        candidates = [Path(choice)] if explicit else [self.store.path(s) for s in existing]
        if not candidates:
            if init_from:
                log.info(f"no checkpoint in {self.store.root}: starting from {init_from}")
                self.init_from(init_from)
            else:
                log.info(f"no checkpoint in {self.store.root}: starting from step 0")
            return None
        failures: list[str] = []
        for step, path in zip(existing if not explicit else [None], candidates, strict=True):
            try:
                self._load_verified(path, self._precheck(path))
            except IncompatibleCheckpointError:
                raise
            except CheckpointError as e:
                if explicit:
                    raise
                failures.append(f"{path.name}: {e}")
                self.protected_steps.add(step)
                log.warning(f"skipping checkpoint {path} (kept on disk): {e}")
                continue
            return path
        if self.t.step:
            raise CheckpointError("no complete checkpoint to fall back to after a failed load")
        err = CheckpointError(
            f"none of the {len(failures)} checkpoints in {self.store.root} verifies "
            f"({'; '.join(failures)}); they are kept as they are. Restore them, or set "
            "checkpoint.resume=none to start from step 0 (existing checkpoints are kept)"
        )
        err.same_on_all_ranks = True
        raise err

    def _load(self, path: Path, meta: dict[str, Any]) -> None:
        t = self.t
        records = file_records(meta)
        if meta.get("kind") == "weights" or "trainer.json" not in records:
            raise IncompatibleCheckpointError(
                f"checkpoint {path} holds weights only (no optimizer or trainer state): start "
                f"from it with checkpoint.init_from={path}"
            )
        state = read_json(path / "trainer.json", records["trainer.json"])
        saved_fp, fp = meta.get("tokenizer_fingerprint"), self._tokenizer_fingerprint()
        if saved_fp and fp and saved_fp != fp:
            raise IncompatibleCheckpointError(
                f"checkpoint {path} does not fit this run: tokenizer fingerprint "
                f"{saved_fp[:12]}… (checkpoint) vs {fp[:12]}… (this run's data.tokenizer_path)"
            )
        self.bytes_read = load_weights(t.engine, t.factory, path, meta["tensors"], optimizer=True)
        runstate.set_optimizer_state(t.engine, state["optimizer"], t.layout.grad_accum_steps)
        same = {k: v for k, v in meta["layout"].items() if "degree" in k or k == "world_size"}
        now = {k: v for k, v in self._layout().items() if k in same}
        rng_file = path / f"rng-r{t.rank:05d}.safetensors"
        if same == now and rng_file.is_file():
            with safe_open(str(rng_file), framework="pt", device="cpu") as f:
                names = f.keys()  # safe_open is not iterable
                runstate.set_rng_state({k: f.get_tensor(k) for k in names}, f.metadata())
        else:
            runstate.reseed(t.cfg.runtime.seed, state["step"], t.rank)
        self.init_source = meta.get("source")
        self._pending_step, t.tokens_seen = state["step"], state["tokens_seen"]
        self.health.load_state_dict(state["health"])
        self._pending_data = state["data"]
        self.last_saved_step, self.loaded_from = state["step"], path
        how = "same layout" if same == now else f"saved at {same}, now {now}"
        self._pending_message = f"resumed from checkpoint {path} (step {state['step']}, {how})"

    def _restore_data(self, data_state: dict[str, Any] | None, step: int) -> None:
        t = self.t
        if data_state is not None and hasattr(t.train_loader, "load_state_dict"):
            t.train_loader.load_state_dict(data_state)
            return
        # A data source without state (tests' synthetic streams): skip the micro batches of the
        # steps already taken. Sources that slice global batches by DP rank stay exact at any DP.
        for _ in range(step * t.layout.grad_accum_steps):
            next(t.train_iter)


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
