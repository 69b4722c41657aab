"""tools/bench/report.py: marked regions of docs/benchmarks.md rewritten from bench results, the
prose around them kept byte for byte; malformed markers and orphan tables fail before a write."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report, results = _load("report"), _load("results")

DOC = """# Benchmarks

Intro prose, kept.

<!-- bench:summary -->
old summary row
<!-- /bench -->

## Loader

Prose about the loader | with a pipe.

<!-- bench:loader -->
| old | table |
| --- | --- |
| 1 | 2 |
<!-- /bench -->

More prose.

<!-- bench:pipeline -->
pipeline table from an earlier run
<!-- /bench -->
Trailing prose.
"""


def _loader_result(tmp_path):
    rec = results.Record("loader", "tools/bench/loader.py")
    rec.table(
        "loader", ["pass", "tokens/s", "ratio"], [["raw", "3,731M", 1.0], ["zenlm", "70M", 0.019]]
    )
    rec.doc["tables"]["loader"]["notes"] = ["A note | with a pipe."]
    rec.summary("loader vs raw read", ">= 0.5", "warm 0.019", False)
    rec.summary("loader wait", "< 1%", "0.16%", True)
    return rec.write(tmp_path / "res", data={"ratio": 0.019})


def test_regions_rewritten_prose_kept(tmp_path):
    _loader_result(tmp_path)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    assert report.main(["--results", str(tmp_path / "res"), "--doc", str(doc)]) == 0
    new = doc.read_text()

    # Outside the replaced regions nothing changed, the untouched region included.
    def outside(text):
        keep, skip = [], False
        for line in text.split("\n"):
            if line in ("<!-- bench:loader -->", "<!-- bench:summary -->"):
                skip = True
                keep.append(line)
            elif line == "<!-- /bench -->" and skip:
                skip = False
                keep.append(line)
            elif not skip:
                keep.append(line)
        return keep

    assert outside(new) == outside(DOC)
    assert "pipeline table from an earlier run" in new
    assert "| old | table |" not in new and "old summary row" not in new
    loader = new.split("<!-- bench:loader -->\n")[1].split("<!-- /bench -->")[0]
    lines = loader.strip("\n").split("\n")
    assert lines[0].startswith("Measured ") and "`tools/bench/loader.py" in lines[0]
    assert lines[2:6] == [
        "| pass | tokens/s | ratio |",
        "| --- | --- | --- |",
        "| raw | 3,731M | 1.0 |",
        "| zenlm | 70M | 0.019 |",
    ]
    assert lines[-1] == "A note | with a pipe."
    summary = new.split("<!-- bench:summary -->\n")[1].split("<!-- /bench -->")[0]
    assert (
        "| loader vs raw read | `tools/bench/loader.py` | >= 0.5 | warm 0.019 | **not met** |"
        in summary
    )
    assert "| loader wait | `tools/bench/loader.py` | < 1% | 0.16% | met |" in summary
    # A second run over its own output changes nothing (idempotent), and --check agrees.
    assert report.main(["--results", str(tmp_path / "res"), "--doc", str(doc), "--check"]) == 0
    doc.write_text(DOC)
    assert report.main(["--results", str(tmp_path / "res"), "--doc", str(doc), "--check"]) == 1
    assert doc.read_text() == DOC  # --check writes nothing


def test_result_file_is_json_with_raw_data(tmp_path):
    path = _loader_result(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["bench"] == "loader" and doc["data"] == {"ratio": 0.019}
    assert set(doc["measured"]) >= {"start_utc", "end_utc", "load1_start", "load1_end", "cores"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("<!-- bench:loader -->\nx\n", "never closed"),
        ("<!-- bench:loader -->\n<!-- bench:summary -->\n<!-- /bench -->\n", "opens inside"),
        ("x\n<!-- /bench -->\n", "without an open"),
        (
            "<!-- bench:loader -->\n<!-- /bench -->\n<!-- bench:loader -->\n<!-- /bench -->\n",
            "appears twice",
        ),
        ("<!-- bench:summary -->\n<!-- /bench -->\n", "no <!-- bench:NAME --> region"),
    ],
)
def test_malformed_documents_fail_before_writing(tmp_path, text, message):
    _loader_result(tmp_path)
    doc = tmp_path / "benchmarks.md"
    doc.write_text(text)
    with pytest.raises(report.ReportError, match=message):
        report.rewrite(text, report.regions_from(report.load_results(tmp_path / "res")))
    assert report.main(["--results", str(tmp_path / "res"), "--doc", str(doc)]) == 2
    assert doc.read_text() == text


def test_rows_must_match_columns():
    rec = results.Record("x", "tools/bench/x.py")
    with pytest.raises(ValueError, match="2 cells"):
        rec.table("x", ["a", "b"], [["1"]])
