"""The machine-readable result every bench script writes, and what tools/bench/report.py reads.

    ap = argparse.ArgumentParser(); results.add_argument(ap)     # --results DIR
    rec = results.Record("loader", "tools/bench/loader.py")      # notes time and load at start
    rec.table("loader", columns, rows, notes=[...])              # a table for docs/benchmarks.md
    rec.summary("loader vs raw read", "target text", "result text", met=True)
    rec.write(args.results, data={...})                          # DIR/loader.json (no-op without)

One JSON file per bench: when and where it ran (UTC time, cores, 1-minute load average at start
and end), its summary row for the table at the top of docs/benchmarks.md, its tables (strings,
already formatted, keyed by the region of docs/benchmarks.md they replace) and `data`, the raw
numbers (seconds, rates, ratios) for anyone who wants more than the tables.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def add_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--results",
        metavar="DIR",
        default=None,
        help="also write the result as DIR/<bench>.json (tools/bench/report.py reads it)",
    )


def load1() -> float:
    """The 1-minute load average (how busy the shared machine was)."""
    return round(os.getloadavg()[0], 2)


class Record:
    """One bench run's result, filled in as the bench goes."""

    def __init__(self, bench: str, command: str) -> None:
        self.bench = bench
        self.doc: dict[str, Any] = {
            "schema": SCHEMA_VERSION,
            "bench": bench,
            "command": command,
            "argv": sys.argv[1:],
            "measured": {
                "start_utc": _now(),
                "cores": os.cpu_count(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "load1_start": load1(),
            },
            "summary": [],
            "tables": {},
        }

    def table(
        self,
        region: str,
        columns: list[str],
        rows: list[list[Any]],
        notes: list[str] | None = None,
    ) -> None:
        """A table for the `<!-- bench:REGION -->` region; cells are shown as str(cell)."""
        if any(len(r) != len(columns) for r in rows):
            raise ValueError(f"table {region}: every row needs {len(columns)} cells")
        self.doc["tables"][region] = {
            "columns": list(columns),
            "rows": [[str(c) for c in r] for r in rows],
            "notes": list(notes or []),
        }

    def summary(self, benchmark: str, target: str, result: str, met: bool | None) -> None:
        """A row of the summary table (met: None where the target is 'report' only)."""
        self.doc["summary"].append(
            {"benchmark": benchmark, "target": target, "result": result, "met": met}
        )

    def write(self, results_dir: str | os.PathLike | None, data: dict[str, Any]) -> Path | None:
        self.doc["measured"].update(end_utc=_now(), load1_end=load1())
        self.doc["data"] = data
        if results_dir is None:
            return None
        out = Path(results_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{self.bench}.json"
        path.write_text(json.dumps(self.doc, indent=1, sort_keys=False) + "\n")
        print(f"result written to {path}")
        return path


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
