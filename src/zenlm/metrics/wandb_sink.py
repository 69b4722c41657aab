"""Weights & Biases scalars (a metrics sink, zenlm.metrics.sinks; rank 0 only).

One W&B run per zenlm run: project `logging.wandb_project`, name `logging.wandb_run_name` (default:
`logging.run_name`), mode `logging.wandb_mode` ('offline' writes <run>/wandb/offline-run-*/ for
`wandb sync`, 'online' streams and needs `wandb login` or WANDB_API_KEY). The resolved config is
the run's config. W&B's console capture is off (it would rewrap stdout under torchrun) and so is
its system-stats sampling. preflight refuses wandb_enabled without the package installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from zenlm.config.schema import RunConfig


class WandbSink:
    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        import wandb

        lg = cfg.logging
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True)
        self._run = wandb.init(
            project=lg.wandb_project,
            name=lg.wandb_run_name or lg.run_name,
            mode=lg.wandb_mode,
            dir=str(run_dir),
            config=asdict(cfg),
            settings=settings,
            # Several runs in one process (tests, sweeps built in Python) each get their own.
            reinit="create_new",
        )

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(dict(values), step=step)

    def close(self) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            # finish() returns before W&B's service process has written the run file (measured:
            # an offline run file still at its 7-byte header right after); teardown waits for
            # the service to exit, so the files are complete when the trainer closes. It ends
            # W&B in this process: other W&B runs of the same process would need a new init.
            wandb.teardown()
            self._run = None
