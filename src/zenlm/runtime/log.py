"""Rank-aware logging: rank 0 prints INFO, other ranks only warnings and errors."""

from __future__ import annotations

import logging
import os
import sys


def get_logger(name: str = "zenlm") -> logging.Logger:
    logger = logging.getLogger(name)
    if not logger.handlers:
        rank = int(os.environ.get("RANK", "0"))
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%H:%M:%S")
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        logger.propagate = False
    return logger
