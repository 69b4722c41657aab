"""Corpora on disk (format), and the streaming loader: global sample order, blending, resume.

Exports are resolved lazily: the preprocess workers import zenlm.data.* submodules and must not
pay for importing torch (which the loader needs) on every spawn.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BlendSchedule": "zenlm.data.blend",
    "CorpusError": "zenlm.data.format",
    "TrainLoader": "zenlm.data.loader",
    "ValidLoader": "zenlm.data.loader",
    "build_train_loader": "zenlm.data.loader",
    "build_valid_loader": "zenlm.data.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'zenlm.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
