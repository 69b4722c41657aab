"""Corpora on disk (format), and the streaming loader: global sample order, blending, resume."""

from zenlm.data.blend import BlendSchedule
from zenlm.data.format import CorpusError
from zenlm.data.loader import TrainLoader, ValidLoader, build_train_loader, build_valid_loader

__all__ = [
    "BlendSchedule",
    "CorpusError",
    "TrainLoader",
    "ValidLoader",
    "build_train_loader",
    "build_valid_loader",
]
