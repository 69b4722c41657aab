"""Known-harmless third-party warnings: each shown once, on rank 0; silenced on the other ranks.

    install_known_warnings()   # launch/train.py, before the megatron/DeepSpeed imports; Trainer

`KNOWN` is the documented list: who emits each warning, how (a Python warning of a category, or
a record of a named `logging` logger), a regex of its message and why zenlm can ignore it. On
rank 0 the first warning matching an entry prints as one line naming the entry; later matches of
the same entry are dropped. On every other rank matches are dropped. A warning that matches no
entry passes exactly as before, on every rank. Installing twice changes nothing, and installing
again after something reset the warning filters (pytest does per test) re-applies them.

What this cannot filter: DeepSpeed's and megatron's plain `print` calls (e.g. "DeepSpeed
deepspeed.ops.comm.deepspeed_shm_comm_op built successfully" from each rank, the pipeline
partition and bf16 memory lines at PP > 1): they are not warnings (docs/training.md, Console).
Imports nothing heavy: it runs before torch.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class KnownWarning:
    """One known-harmless warning."""

    source: str
    """Who emits it (shown in the line)."""
    message: str
    """Regex searched in the message text."""
    why: str
    """Why zenlm can ignore it (shown in the line)."""
    category: type[Warning] | None = None
    """A Python warning of this category (or a subclass); None for a logging record."""
    logger: str = ""
    """For a logging record: the name of the logging.Logger that emits it."""


KNOWN: tuple[KnownWarning, ...] = (
    KnownWarning(
        source="megatron-core",
        message=r"Transformer Engine and Apex are not installed",
        category=UserWarning,
        why="zenlm uses megatron-core's plain-torch tensor-parallel layers and torch AdamW "
        "through DeepSpeed, none of the fused TE/Apex kernels it falls back from",
    ),
    KnownWarning(
        source="DeepSpeed",
        message=r"Setting accelerator to CPU\. If you have GPU",
        logger="DeepSpeed",
        why="no CUDA device visible, so DeepSpeed uses its CPU accelerator and zenlm gloo "
        "(expected on CPU; on a GPU node it means CUDA is not visible)",
    ),
    KnownWarning(
        source="torch",
        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
        r"is deprecated",
        category=FutureWarning,
        why="megatron-core 0.16 and DeepSpeed 0.19 call torch's deprecated names of these "
        "collectives; the same collective runs",
    ),
)

_shown: set[KnownWarning] = set()


def known_entry(text: str, category: type[Warning] | None, logger: str = "") -> KnownWarning | None:
    """The entry of KNOWN matching a warning (category set) or a logging record (logger set)."""
    for entry in KNOWN:
        if entry.category is not None:
            if category is None or not issubclass(category, entry.category):
                continue
        elif entry.logger != logger:
            continue
        if re.search(entry.message, text):
            return entry
    return None


def _announce(entry: KnownWarning, text: str, stream: TextIO | None = None) -> None:
    """Rank 0: the entry's first match as one line; nothing for later matches."""
    if entry in _shown:
        return
    _shown.add(entry)
    first = " ".join(text.split())
    print(
        f"warning (known, harmless: {entry.why}; shown once, zenlm/runtime/warnings.py): "
        f"{entry.source}: {first}",
        file=stream or sys.stderr,
        flush=True,
    )


class _KnownRecords(logging.Filter):
    """On a third-party logger: drops records matching KNOWN (rank 0 announces the first)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        entry = known_entry(record.getMessage(), None, record.name)
        if entry is None:
            return True
        if self.rank == 0:
            _announce(entry, record.getMessage())
        return False


_previous_showwarning: Any = None


def _showwarning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    entry = known_entry(str(message), category)
    if entry is None:
        _previous_showwarning(message, category, filename, lineno, file, line)
    else:
        _announce(entry, str(message), file)


_record_filters: dict[int, _KnownRecords] = {}


def install_known_warnings(rank: int | None = None) -> None:
    """Apply KNOWN in this process. `rank` defaults to $RANK (torchrun sets it; 0 alone)."""
    global _previous_showwarning
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    for entry in KNOWN:
        if entry.category is not None and rank != 0:
            # Python filters match the start of the message (case-insensitive): hence ".*".
            warnings.filterwarnings("ignore", message=".*" + entry.message, category=entry.category)
    if rank == 0 and warnings.showwarning is not _showwarning:
        # Rank 0 sees each warning through the filters as usual (once per call site) and this
        # hook turns the known ones into one line per entry.
        _previous_showwarning = warnings.showwarning
        warnings.showwarning = _showwarning
    records = _record_filters.setdefault(rank, _KnownRecords(rank))
    for name in {e.logger for e in KNOWN if e.logger}:
        # A logger's filters see the records logged on it (DeepSpeed logs on "DeepSpeed" itself);
        # addFilter skips a filter already there. Set before `import deepspeed` creates its
        # handler: getLogger returns the same object then.
        logging.getLogger(name).addFilter(records)
