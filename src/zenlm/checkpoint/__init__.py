"""Atomic, layout-independent checkpoints (safetensors + JSON); see docs/checkpoints.md.

io.py        write + fsync + CRC-32 in one pass; verified reads; never unpickles
store.py     the directory: temp dir, meta.json last, rename, `latest`, retention, discovery
tensors.py   full fp32 weights and AdamW moments out of / into DeepSpeed (ZeRO 0-3, PP, TP)
weights.py   which rank writes which tensors; load into any layout
runstate.py  RNG, LR schedule, DeepSpeed counters
faults.py    signals / flag file, non-finite step skipping, loss spikes
session.py   what the Trainer calls: resume, after_step, finish
"""

from zenlm.checkpoint.io import CheckpointError, safe_torch_load
from zenlm.checkpoint.store import CheckpointStore, newest_valid, read_meta, verify

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "newest_valid",
    "read_meta",
    "safe_torch_load",
    "verify",
]
