"""One line per error for every command-line tool.

    def main(argv=None) -> int:
        return run_tool(lambda: _main(parse_args(argv)))

An error zenlm raises on purpose (zenlm.errors.ZenlmError: config, corpus, checkpoint, bad input)
is printed as a single ``error: <message>`` line on stderr and the tool exits 2; anything else is
a bug and propagates with its traceback. Under torchrun an error every rank shares is printed by
rank 0 only; an error of one rank is printed by that rank, prefixed with its number.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from zenlm.errors import ZenlmError

EXIT_BAD_INPUT = 2


def error_line(e: ZenlmError) -> str:
    """The message on one line (a multi-line message is joined with '; ').

    An error raised in a DataLoader worker arrives re-raised by torch with the worker's
    traceback in its message ("Caught CorpusError in DataLoader worker process 0. Original
    Traceback ..."); its last line holds the original message, which is what is shown."""
    parts = [part.strip() for part in str(e).splitlines() if part.strip()]
    if any(p.startswith("Original Traceback") for p in parts):
        last = parts[-1]
        parts = [last.split(": ", 1)[1] if last.startswith(type(e).__module__) else last]
    return "error: " + ("; ".join(parts) or type(e).__name__)


def run_tool(body: Callable[[], int | None]) -> int:
    """Run a tool's body; a ZenlmError becomes one stderr line and exit code 2."""
    try:
        return body() or 0
    except ZenlmError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not e.same_on_all_ranks:
            prefix = "" if rank == 0 else f"[rank {rank}] "
            print(prefix + error_line(e), file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
