"""Rewrite docs/benchmarks.md's tables from the bench results of one run; the prose stays.

    .venv/bin/python tools/bench/report.py --results .cache/bench          # what `make bench` runs
    .venv/bin/python tools/bench/report.py --results .cache/bench --check  # exit 1 if it would change

Tables live between markers in the document:

    <!-- bench:loader -->
    ... generated: replaced on every run that has a result for it ...
    <!-- /bench -->

Each `<bench>.json` in the results directory (tools/bench/results.py) carries tables keyed by
region name; `summary` is built from every result's summary rows. A region with no result in this
run is left as it is (and listed), so a partial run (`make bench BENCHES=loader`) updates only
its own tables. A table without a region in the document, a region opened twice or never closed
fails with the line number, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "benchmarks.md"
OPEN = re.compile(r"^<!-- bench:([a-z0-9_-]+) -->$")
CLOSE = "<!-- /bench -->"
# Summary rows in this order (benches not listed come after, by name).
ORDER = ("loader", "preprocess", "step_overhead", "pipeline", "checkpoint", "verify", "convert")


class ReportError(ValueError):
    pass


def markdown_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(columns), line(["---"] * len(columns)), *(line(r) for r in rows)]


def measured_line(result: dict[str, Any]) -> str:
    m = result["measured"]
    return (
        f"Measured {m['start_utc']} ({m['cores']} cores, 1-min load average "
        f"{m['load1_start']:g} at the start, {m['load1_end']:g} at the end): "
        f"`{' '.join([result['command'], *result.get('argv', [])])}`"
    )


def render_region(result: dict[str, Any], table: dict[str, Any]) -> list[str]:
    lines = [measured_line(result), "", *markdown_table(table["columns"], table["rows"])]
    if table.get("notes"):
        lines += ["", *table["notes"]]
    return lines


def summary_region(results: list[dict[str, Any]]) -> list[str]:
    rank = {b: i for i, b in enumerate(ORDER)}
    rows = []
    for r in sorted(results, key=lambda r: (rank.get(r["bench"], len(ORDER)), r["bench"])):
        day = r["measured"]["start_utc"].split(" ")[0]
        for s in r["summary"]:
            verdict = {True: "met", False: "**not met**", None: "report"}[s["met"]]
            rows.append(
                [
                    s["benchmark"],
                    f"`{r['command']}`",
                    s["target"],
                    s["result"],
                    verdict,
                    f"{day}, load {r['measured']['load1_start']:g}-{r['measured']['load1_end']:g}",
                ]
            )
    columns = ["benchmark", "command", "target", "result", "target met", "measured"]
    return markdown_table(columns, rows)


def regions_from(results: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Region name -> generated lines, from every result of this run."""
    out: dict[str, list[str]] = {}
    for r in results:
        for name, table in r["tables"].items():
            if name in out or name == "summary":
                raise ReportError(f"{r['bench']}.json: table region {name!r} given twice")
            out[name] = render_region(r, table)
    if any(r["summary"] for r in results):
        out["summary"] = summary_region(results)
    return out


def rewrite(text: str, regions: dict[str, list[str]]) -> tuple[str, list[str], list[str]]:
    """Replace each marked region's body with regions[name]; returns (text, replaced, kept).

    Raises ReportError for a region opened twice, nested, never closed, a close without an
    open, or a generated region the text has no marker for.
    """
    lines = text.split("\n")
    out: list[str] = []
    seen: set[str] = set()
    replaced, kept = [], []
    current: str | None = None
    opened_at = 0
    for no, line in enumerate(lines, 1):
        m = OPEN.match(line.strip())
        if m:
            if current is not None:
                raise ReportError(f"line {no}: region {m[1]!r} opens inside {current!r}")
            if m[1] in seen:
                raise ReportError(f"line {no}: region {m[1]!r} appears twice")
            current, opened_at = m[1], no
            seen.add(current)
            out.append(line)
            if current in regions:
                out += regions[current]
                replaced.append(current)
            else:
                kept.append(current)
            continue
        if line.strip() == CLOSE:
            if current is None:
                raise ReportError(f"line {no}: {CLOSE} without an open region")
            current = None
            out.append(line)
            continue
        if current is None or current not in regions:
            out.append(line)  # prose, or the old body of a region this run has no result for
    if current is not None:
        raise ReportError(f"line {opened_at}: region {current!r} is never closed ({CLOSE})")
    missing = sorted(set(regions) - seen)
    if missing:
        raise ReportError(f"no <!-- bench:NAME --> region in the document for: {missing}")
    return "\n".join(out), replaced, kept


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise ReportError(f"no bench results (*.json) in {results_dir}")
    return [json.loads(f.read_text()) for f in files]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, required=True, help="directory of <bench>.json files")
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    a = ap.parse_args(argv)
    try:
        results = load_results(a.results)
        text = a.doc.read_text()
        new, replaced, kept = rewrite(text, regions_from(results))
    except (ReportError, OSError, json.JSONDecodeError, KeyError) as e:
        print(f"report.py: {e}", file=sys.stderr)
        return 2
    print(f"regions from this run: {', '.join(replaced) or 'none'}")
    if kept:
        print(f"regions kept as they were (no result in {a.results}): {', '.join(kept)}")
    if a.check:
        return int(new != text)
    if new != text:
        a.doc.write_text(new)
        print(f"rewrote {a.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
