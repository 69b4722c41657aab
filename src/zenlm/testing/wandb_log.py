"""Read back the history rows of an offline W&B run, independently of wandb's own client.

    rows = wandb_history(run_dir)   # [{"_step": 3, "train/loss": 2.1, ...}, ...]

For tests: the run file is W&B's record log, parsed here from its on-disk layout rather than read
through the writer under test.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of the one offline W&B run under run_dir, read from its .wandb file: W&B's
    record log (a LevelDB-style log: 7-byte file header ':W&B', magic 0xBEE1, version; 32 KiB
    blocks of chunks with a crc32/length/type header, FULL=1 FIRST=2 MIDDLE=3 LAST=4), each
    record a wandb_internal Record protobuf."""
    from wandb.proto import wandb_internal_pb2

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    rows, pos, block, pending = [], 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item  # keys as `key` or as `nested_key` parts
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows
