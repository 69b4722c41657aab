"""The training loop: step, validate, log. Everything else is assembled in zenlm.train.build.

    trainer = Trainer(cfg)            # inside torchrun (or one plain process)
    history = trainer.fit()           # list of per-step metrics dicts, same on every rank

One optimizer step consumes layout.global_batch_size_seqs sequences: grad_accum_steps micro
batches on each data-parallel rank. The train loss reported for a step is the mean over the
global batch (all-reduced over the data-parallel group), identical on every rank.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from zenlm.checkpoint.session import CheckpointSession
from zenlm.config.load import dump_config
from zenlm.config.schema import RunConfig
from zenlm.config.validate import check_precision_supported, run_dir
from zenlm.metrics.memory import GIB, gather_per_rank, peak_memory_bytes
from zenlm.metrics.sinks import build_sinks
from zenlm.metrics.step_clock import StepClock
from zenlm.metrics.throughput import achieved_tflops, detect_peak_tflops, flops_per_token, mfu
from zenlm.model.factory import IGNORE_INDEX
from zenlm.runtime.device import collective_device
from zenlm.runtime.env import init_distributed, set_seeds, set_threads
from zenlm.runtime.log import get_logger
from zenlm.runtime.warnings import install_known_warnings
from zenlm.train.build import (
    build_parallel,
    build_training_engine,
    model_inputs,
    pipeline_batch,
)
from zenlm.train.preflight import preflight, weights_source

log = get_logger()

DataFactory = Callable[[int, int], Iterable[dict[str, torch.Tensor]]]


def _dp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group()


class Trainer:
    """A run on this rank.

    `train_data(dp_rank, dp_size)` returns this rank's endless micro-batch iterable and
    `valid_data(dp_rank, dp_size)` a re-iterable of validation micro batches; both default to the
    corpora in cfg.data (zenlm.data loaders). Tests and benchmarks pass synthetic ones.
    """

    def __init__(
        self,
        cfg: RunConfig,
        train_data: DataFactory | None = None,
        valid_data: DataFactory | None = None,
    ) -> None:
        install_known_warnings()  # before DeepSpeed's first log lines (zenlm.runtime.warnings)
        set_threads(cfg.runtime.torch_threads)
        self.rank, world_size = init_distributed(cfg.runtime.dist_timeout_s)
        self.cfg = cfg
        # Config, corpora, tokenizer, output dirs, the checkpoint to resume (launch/train.py ran
        # this before the framework imports too), then the device's precision support.
        self.layout = preflight(cfg, world_size, corpora=train_data is None)
        check_precision_supported(cfg.runtime.precision)
        set_seeds(cfg.runtime.seed)
        self.dims = build_parallel(cfg, self.layout)
        # No init drawn when a checkpoint will be loaded (a failed load stops the run).
        loads = weights_source(cfg) is not None
        self.engine, self.factory = build_training_engine(
            cfg, self.layout, self.dims, init=not loads
        )
        self.pipelined = self.layout.pipeline_parallel_degree > 1
        # Step-time split (zenlm.metrics.step_clock): data wait, optimizer step, DP gradient
        # reduction; read at log steps.
        self.clock = StepClock(cuda=torch.cuda.is_available())
        self.measured_phases = self.clock.instrument(self.engine)
        self.run_dir = run_dir(cfg)
        dp_rank = self.dims.coords(self.rank)[1]
        if train_data is None:
            self.train_loader, self.valid_data = self._build_corpus_loaders(dp_rank)
        else:
            self.train_loader = train_data(dp_rank, self.dims.dp)
            self.valid_data = valid_data(dp_rank, self.dims.dp) if valid_data else None
        self.train_iter: Iterator = iter(self.train_loader)
        # DeepSpeed's pipeline pulls grad_accum_steps micro batches per train_batch itself.
        self.pipe_iter = self._pipeline_stream()
        self.step = 0
        self.tokens_seen = 0
        self.stopped_by_signal: int | None = None  # set by fit() when a stop signal ended it
        self.flops_per_token = flops_per_token(cfg.model, self.layout.seq_len_tokens)
        self.peak_tflops = self._peak_tflops()
        # Checkpoints (zenlm.checkpoint.session): resume now, so step/data/optimizer continue.
        self.checkpoints = CheckpointSession(self)
        self.checkpoints.resume()
        # Only after the resume succeeded: a run stopped by a checkpoint it cannot use leaves
        # the run directory (config.yaml, TensorBoard events) as it found it.
        if self.rank == 0:
            dump_config(cfg, self.run_dir / "config.yaml")
        self.metrics = build_sinks(cfg, self.run_dir, self.rank)  # TensorBoard, W&B: rank 0

    def _build_corpus_loaders(self, dp_rank: int) -> tuple[Any, Any]:
        from zenlm.data import build_train_loader, build_valid_loader
        from zenlm.data.tokenizer import fingerprint_file

        d = self.cfg.data  # checked in preflight: corpora exist, fit seq_len, tokenizer, vocab
        common = dict(
            corpora=[(c.path, c.weight) for c in d.corpora],
            seq_len=d.seq_len_tokens,
            micro_batch_size=d.micro_batch_size_seqs,
            dp_rank=dp_rank,
            dp_size=self.dims.dp,
            expected_tokenizer_fingerprint=fingerprint_file(d.tokenizer_path)
            if d.tokenizer_path
            else None,
            verify_checksums=d.verify_checksums,
        )
        train = build_train_loader(
            **common,
            global_batch_size=d.global_batch_size_seqs,
            num_workers=d.num_workers,
            seed=d.seed,
        )
        if not self.cfg.logging.eval_interval_steps:
            return train, None  # validation off: the corpora need no 'valid' split
        valid = build_valid_loader(
            **common, num_samples=self.cfg.logging.eval_samples, num_workers=d.num_workers
        )
        return train, valid

    # -- one optimizer step ------------------------------------------------------------------

    def _step_batches(self) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """This rank's grad_accum_steps micro batches of the next step, and the loss
        denominator: the step's counted tokens over all micro batches and DP ranks, divided by
        (micro batches x DP) (see zenlm.model.loss.mean_loss). One scalar all-reduce per step."""
        lay = self.layout
        with self.clock.phase("data"):
            batches = [next(self.train_iter) for _ in range(lay.grad_accum_steps)]
        counted = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
        total = torch.tensor([float(counted)], dtype=torch.float64, device=collective_device())
        with self.clock.phase("comm"):
            dist.all_reduce(total, group=_dp_group())
        per_micro = total.clamp(min=1.0) / (lay.grad_accum_steps * self.dims.dp)
        return batches, per_micro.float().reshape(())

    def _pipeline_stream(self) -> Iterator:
        """Micro batches for DeepSpeed's pipeline, with the step's loss denominator in the
        labels. Only the first and last stages draw from it; the all-reduce in _step_batches
        then runs in their (stage-local) DP groups, where every peer draws at the same point."""
        masking = self.cfg.model.document_masking
        while True:
            batches, denominator = self._step_batches()
            for b in batches:
                yield pipeline_batch(b, masking, denominator)

    def train_step(self) -> float:
        """Run grad_accum_steps micro batches and one optimizer step; return the global mean loss."""
        self.step += 1
        self.tokens_seen += self.layout.tokens_per_step
        if self.pipelined:
            # 1F1B over the stages; the loss comes back averaged over micro batches and DP
            # replicas and broadcast from the last stage to every stage.
            return self.engine.train_batch(data_iter=self.pipe_iter).item()
        masking = self.cfg.model.document_masking
        losses = []
        batches, denominator = self._step_batches()
        denominator = denominator.to(self.engine.device)
        for micro in batches:
            batch = model_inputs(micro, masking, self.engine.device)
            loss = self.engine(**batch, loss_denominator=denominator)
            self.engine.backward(loss)
            self.engine.step()  # a no-op except at the accumulation boundary
            losses.append(loss.detach().float())
        mean = torch.stack(losses).mean()
        with self.clock.phase("comm", device=True):
            dist.all_reduce(mean, group=_dp_group())
        return mean.item() / self.dims.dp

    # -- validation --------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and next-token accuracy over the validation batches of all DP ranks."""
        if self.valid_data is None:
            return {}
        totals = self._pipeline_eval_totals() if self.pipelined else self._eval_totals()
        totals = totals.to(collective_device())
        dist.all_reduce(totals, group=_dp_group())
        loss = (totals[0] / totals[2].clamp(min=1)).item()
        return {
            "val/loss": loss,
            "val/perplexity": float(torch.exp(torch.tensor(loss))),
            "val/accuracy": (totals[1] / totals[2].clamp(min=1)).item(),
        }

    def _eval_totals(self) -> torch.Tensor:
        self.engine.eval()
        masking = self.cfg.model.document_masking
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, counted
        for batch in self.valid_data:
            inputs = model_inputs(batch, masking, self.engine.device)
            totals += self.engine(**inputs, return_stats=True).cpu()
        self.engine.train()
        return totals

    def _pipeline_eval_totals(self) -> torch.Tensor:
        """Validation through the pipeline: the last stage computes the (3,) stats per micro
        batch; they are broadcast from it to every stage of this pipeline."""
        masking = self.cfg.model.document_masking
        batches = [pipeline_batch(b, masking) for b in self.valid_data]
        loss_fn = self.engine.module.loss_fn
        loss_fn.stats = True
        # DeepSpeed keeps the last train_batch's scalar total_loss and adds each eval micro
        # batch's output to it (eval_batch never resets it): start from None so the (3,) stats
        # do not meet a () tensor.
        self.engine.total_loss = None
        outputs = self.engine.eval_batch(
            iter(batches),
            compute_loss=True,
            reduce_output=None,
            bcast_loss=False,
            num_micro_batches=len(batches),
        )
        loss_fn.stats = False
        self.engine.total_loss = None
        self.engine.train()
        device = collective_device()
        totals = torch.zeros(3, dtype=torch.float64, device=device)
        if self.engine.is_last_stage():
            totals = torch.stack(list(outputs)).sum(dim=0).to(device, torch.float64)
        grid = self.engine.grid
        last = grid.stage_to_global(grid.get_pipe_parallel_world_size() - 1)
        dist.broadcast(totals, src=last, group=grid.get_pipe_parallel_group())
        return totals

    # -- the loop ----------------------------------------------------------------------------

    def _scalars(self, loss: float, lr: float, step_s: float) -> dict[str, float]:
        tokens_per_s = self.layout.tokens_per_step / max(step_s, 1e-9)
        out = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
            "train/tokens_per_s": tokens_per_s,
            "train/tokens_seen": float(self.tokens_seen),
            "train/step_time_s": step_s,
        }
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        if self.cfg.runtime.precision == "fp16" and scale is not None:
            out["train/loss_scale"] = float(scale)
        return out

    def _interval_scalars(self) -> dict[str, float]:
        """What a log step adds, over the steps since the last one: tokens/s and step time
        (interval means, replacing the step's own), the step-time split, peak memory (max over
        ranks, and per rank), skipped steps, TFLOP/s per device and MFU. Gathers over all
        ranks: every rank calls it at the same steps (docs/training.md, Metrics)."""
        t = self.clock.drain()
        rows = gather_per_rank([*peak_memory_bytes(), t["data"]])  # (world, 3)
        world = self.layout.world_size
        tokens_per_s = self.layout.tokens_per_step / max(t["step"], 1e-9)
        out = {
            "train/tokens_per_s": tokens_per_s,
            "train/step_time_s": t["step"],
            "train/tflops_per_device": achieved_tflops(tokens_per_s, self.flops_per_token, world),
            "train/skipped_steps": float(self.engine.skipped_steps),
            "time/data_wait_s": t["data"],
            "time/data_wait_s_max": float(rows[:, 2].max()),
            "time/fwd_bwd_s": t["fwd_bwd"],
            "time/comm_s": t["comm"],
            "mem/peak_gib": float(rows[:, 0].max()) / GIB,
        }
        if "optimizer" in self.measured_phases:
            out["time/optimizer_s"] = t["optimizer"]
        if torch.cuda.is_available():
            out["mem/peak_reserved_gib"] = float(rows[:, 1].max()) / GIB
        if world > 1:
            out.update({f"mem/peak_gib_rank{r}": float(v) / GIB for r, v in enumerate(rows[:, 0])})
        if self.peak_tflops:
            out["train/mfu"] = mfu(tokens_per_s, self.flops_per_token, world, self.peak_tflops)
        return out

    def _peak_tflops(self) -> float:
        """logging.peak_tflops_per_device, else the device table by name and precision; 0 when
        unknown (then TFLOP/s is logged without MFU, and one line says so)."""
        if self.cfg.logging.peak_tflops_per_device:
            return self.cfg.logging.peak_tflops_per_device
        peak, device = detect_peak_tflops(self.cfg.runtime.precision)
        if not peak:
            log.info(
                f"MFU not reported: no peak FLOP/s known for {device} at runtime.precision="
                f"{self.cfg.runtime.precision}; TFLOP/s per device is. Set "
                "logging.peak_tflops_per_device (dense TFLOP/s of one device) for MFU"
            )
        return peak

    def fit(self) -> list[dict[str, float]]:
        """Train to optim.train_steps, or until a stop signal: then `stopped_by_signal` holds its
        number, the last step is saved (unless the signal came before the first step: the
        loaded checkpoint, or nothing, is then the state to resume) and launch/train.py exits
        with zenlm.runtime.signals.PREEMPTED_EXIT_CODE."""
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        # SIGTERM/SIGUSR1: save at the step boundary, stop. launch/train.py installed the
        # handlers before set-up already; a signal received since is acted on before step 1.
        self.checkpoints.requests.install()
        try:
            if self.checkpoints.stop_before_start():
                self.stopped_by_signal = self.checkpoints.requests.signal_received
                return history
            self._loop(history, start)
        finally:
            self.checkpoints.requests.uninstall()
            self.metrics.close()
        return history

    def _loop(self, history: list[dict[str, float]], start: float) -> None:
        lg, total = self.cfg.logging, self.cfg.optim.train_steps
        self._first_step = self.step  # for the ETA: steps before a resume took no time here
        while self.step < total:
            lr = self.engine.get_lr()[0]  # the lr this step uses (the scheduler steps inside)
            t0 = time.perf_counter()
            skipped_before = self.engine.skipped_steps
            loss = self.train_step()
            step_s = time.perf_counter() - t0
            self.clock.step_done(step_s)
            scalars = self._scalars(loss, lr, step_s)
            # Non-finite steps were skipped by the engine; count them, stop after too many.
            stop = self.checkpoints.after_step(loss, self.engine.skipped_steps > skipped_before)
            scalars.update(self.checkpoints.scalars())
            if lg.eval_interval_steps and (
                self.step % lg.eval_interval_steps == 0 or self.step == total
            ):
                scalars.update(self.evaluate())
            log_now = (
                self.step % lg.log_interval_steps == 0
                or self.step == total
                or "val/loss" in scalars
            )
            if log_now:  # the same steps on every rank: _interval_scalars gathers
                scalars.update(self._interval_scalars())
            history.append({"step": self.step, **scalars})
            if log_now:
                self.metrics.scalars(scalars, self.step)
                self._console(scalars, start)
            if stop:
                self.stopped_by_signal = self.checkpoints.requests.signal_received
                return  # saved already (the stop request implies a save)
        self.checkpoints.finish()

    def close(self) -> None:
        """Flush logs and release this run's process groups (the default group stays), so the
        same processes can build another run at another layout."""
        from zenlm.parallel.dims import release_process_groups

        self.metrics.close()
        self.engine = None
        release_process_groups()

    def _console(self, s: dict[str, float], start: float) -> None:
        elapsed = time.perf_counter() - start
        done = max(self.step - getattr(self, "_first_step", 0), 1)
        eta_s = elapsed / done * (self.cfg.optim.train_steps - self.step)
        line = (
            f"step {self.step}/{self.cfg.optim.train_steps} | loss {s['train/loss']:.4f} | "
            f"lr {s['train/lr']:.2e} | grad_norm {s['train/grad_norm']:.3f} | "
            f"tokens/s {s['train/tokens_per_s']:,.0f} | "
            f"{s['train/tflops_per_device']:.3g} TFLOP/s/device"
        )
        if "train/mfu" in s:
            line += f" (MFU {100 * s['train/mfu']:.1f}%)"
        ms = {k: 1e3 * s.get(f"time/{k}_s", 0.0) for k in ("data_wait", "fwd_bwd", "optimizer")}
        line += (
            f" | step {1e3 * s['train/step_time_s']:.0f} ms = data {ms['data_wait']:.0f} + "
            f"fwd/bwd {ms['fwd_bwd']:.0f} + opt {ms['optimizer']:.0f} + "
            f"comm {1e3 * s['time/comm_s']:.0f} | peak mem {s['mem/peak_gib']:.2f} GiB"
        )
        if s["train/skipped_steps"]:
            line += f" | skipped {s['train/skipped_steps']:.0f} steps"
        line += f" | ETA {eta_s / 60:.1f} min"
        if "val/loss" in s:
            line += f" | val_loss {s['val/loss']:.4f} ppl {s['val/perplexity']:.2f} acc {s['val/accuracy']:.3f}"
        log.info(line)
