"""The base of every error zenlm raises on purpose.

A `ZenlmError` means bad input or a state on disk the user can fix (a config value, a corpus, a
checkpoint, a tokenizer). Its message is one line that names the culprit and what to do. The
command-line tools print it as ``error: <message>`` and exit 2 (zenlm.runtime.cli); any other
exception is a bug and keeps its traceback.

This module imports nothing, so every layer (config, data, checkpoint, train) can use it.
"""

from __future__ import annotations


class ZenlmError(Exception):
    """Bad input or on-disk state the user can fix; the message names the culprit and the fix."""

    same_on_all_ranks: bool = False
    """True when every rank raises the same message (config checks run before any rank differs,
    errors gathered from all ranks): the CLI then prints it on rank 0 only, not once per rank."""
