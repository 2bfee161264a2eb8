"""The benchmark machinery: statistics, peak memory, one process per case, BENCHMARKS.md regeneration.

The regeneration runs ``benchmarks/run_all.py --regen-only`` in a subprocess on fixture JSON
written by ``_harness.write_results`` (the path every script takes), so the whole chain from a
script's tables to the generated block is exercised without running a benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import _harness as H  # noqa: E402


def test_stats_and_ratios():
    s = H.Stats.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    assert s.fmt(1) == "2.0 (1.0-3.0)"
    assert H.Stats.of([0.5]).fmt(2) == "0.50"
    r = H.ratio_stats([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])  # per-round ratios 2, 3, 1
    assert (r.median, r.min, r.max) == (2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="paired rounds"):
        H.ratio_stats([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="at least one"):
        H.Stats.of([])


def test_interleave_runs_round_robin():
    order = []
    t = H.interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3, warmup=1)
    assert order == ["a", "b"] * 4
    assert len(t["a"]) == len(t["b"]) == 3


def test_peak_memory_sees_a_large_temporary():
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.fail("this test needs Linux /proc (the build machine has it)")
    with H.PeakMemory() as m:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del x
    assert 56 <= m.mib <= 200
    with H.PeakMemory() as small:
        torch.ones(10)
    assert small.mib < 32


def test_run_cases_one_process_per_case(tmp_path):
    script = tmp_path / "case.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {os.path.join(ROOT, "benchmarks")!r})
        import _harness as H
        case = json.loads(sys.argv[sys.argv.index("--case") + 1])
        if case["x"] < 0:
            raise SystemExit("negative x refused")
        H.emit({{"pid": os.getpid(), "twice": 2 * case["x"], "threads": os.environ["OMP_NUM_THREADS"]}})
    """))
    cases = [{"x": 1}, {"x": 2}, {"x": -1}]
    res = H.run_cases(str(script), cases, 2, log=None)
    ok = [r for c in cases[:2] for r in res[H.case_key(c)]]
    assert [r["twice"] for r in res[H.case_key({"x": 2})]] == [4, 4]
    assert len({r["pid"] for r in ok}) == 4  # a fresh process for every case and round
    assert all(r["threads"] == "1" for r in ok)
    bad = res[H.case_key({"x": -1})]
    assert len(bad) == 2 and "negative x refused" in bad[0]["error"]


def _write_fixture(tmp_path):
    tbl = H.table(["method", "time"], [["ours", "1.00"], ["peer", "2.50"]], title="Demo", notes=["a note"])
    H.write_results(str(tmp_path / "results_demo.md"), "demo", "Demo results", "python benchmarks/bench_demo.py",
                    [tbl], ["overall note"])
    H.write_results(str(tmp_path / "results_orphan.md"), "orphan", "No markers", "python x.py", [tbl])
    md = tmp_path / "B.md"
    md.write_text("# Title\n\nhand-written text\n\n<!-- BEGIN generated:demo -->\nold table\n"
                  "<!-- END generated:demo -->\n\nmore text\n\n<!-- BEGIN generated:other -->\nkept\n"
                  "<!-- END generated:other -->\n")
    return md


def test_regen_only_rewrites_the_marked_block(tmp_path):
    md = _write_fixture(tmp_path)
    payload = json.loads((tmp_path / "results_demo.json").read_text())
    assert payload["tables"][0]["rows"] == [["ours", "1.00"], ["peer", "2.50"]]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--regen-only",
                           "--out-dir", str(tmp_path), "--benchmarks-md", str(md)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "regenerated demo" in proc.stdout and "no markers for orphan" in proc.stdout
    text = md.read_text()
    assert "old table" not in text
    assert "| ours | 1.00 |\n| peer | 2.50 |" in text
    assert "`python benchmarks/bench_demo.py`" in text and "- a note" in text and "- overall note" in text
    # text outside the markers and blocks without a JSON stay as they were
    assert text.startswith("# Title\n\nhand-written text\n\n<!-- BEGIN generated:demo -->\n")
    assert "more text" in text and "<!-- BEGIN generated:other -->\nkept\n<!-- END generated:other -->" in text
    # regenerating again changes nothing (idempotent)
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--regen-only",
                    "--out-dir", str(tmp_path), "--benchmarks-md", str(md)], capture_output=True, timeout=60)
    assert md.read_text() == text


def test_table_refuses_ragged_rows():
    with pytest.raises(ValueError, match="2 cells for 3 columns"):
        H.table(["a", "b", "c"], [["1", "2"]])


def test_results_file_keeps_other_sections(tmp_path):
    """A results .md that others also write to: the script's block goes first, their text stays."""
    path = tmp_path / "results_x.md"
    path.write_text("## Someone else's section\n\ntheir numbers\n")
    tbl = H.table(["a", "b"], [["1", "2"]])
    H.write_results(str(path), "x", "First", "python x.py", [tbl])
    H.write_results(str(path), "x", "Second", "python x.py", [tbl])
    text = path.read_text()
    assert text.count("<!-- BEGIN generated:x -->") == 1 and "## Second" in text and "## First" not in text
    assert text.endswith("## Someone else's section\n\ntheir numbers\n")
