"""Run the whole benchmark suite with one command and assemble ``SUMMARY.md``.

Every ``benchmarks/bench_*.py`` runs in its own process (one after the other, never two at
once, so they do not share cores), with ``PYTHONPATH`` set to this checkout and one OpenMP
thread.  A script's markdown goes to ``<out-dir>/results_<name>.md`` (through its ``--out``
option when it has one, else its captured standard output).  Then ``<out-dir>/SUMMARY.md``
collects, per script, its exit status, wall time and command, and the first table of its
results (the headline).  A script that fails is reported as failed (with the end of its
standard error); the suite goes on with the next one and exits with status 1 at the end.

    python benchmarks/run_all.py                 # full suite into benchmarks/ (hours on 2 shared cores)
    python benchmarks/run_all.py --quick         # small settings into benchmarks/quick/ (about 10-20 min)
    python benchmarks/run_all.py --only transformer,compile --out-dir /tmp/bench
    python benchmarks/run_all.py --regen-only    # rebuild BENCHMARKS.md's generated tables from saved JSON

``--quick`` writes to ``benchmarks/quick/`` by default so that it never overwrites the
full-suite results committed in ``benchmarks/``.

Generated tables: a script that writes ``results_<name>.json`` (through
``benchmarks/_harness.py``'s ``write_results``) has its tables rendered into BENCHMARKS.md
between the marker lines ``<!-- BEGIN generated:<name> -->`` and
``<!-- END generated:<name> -->``; text outside the markers is never touched, and a JSON
without markers in the file is listed but not inserted.  After a full run the target is the
repository's BENCHMARKS.md; after ``--quick`` it is ``<out-dir>/BENCHMARKS.md``, a copy of
it with the quick tables in (smoke numbers never overwrite the quoted ones).
``--benchmarks-md PATH`` chooses the target explicitly.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from _harness import markdown_table, markers, replace_block  # noqa: E402

# name -> (full arguments, quick arguments, output file stem, takes --out).  Scripts not listed
# here run with no arguments and their standard output is kept.
SCRIPTS = {
    "attention": (["--repeats", "7"], ["--repeats", "2", "--sizes", "small"], "attention", True),
    "backpack": (["--repeats", "5"], ["--repeats", "1", "--models", "small"], "backpack", True),
    "bookkeeping": (["--repeats", "3"], ["--repeats", "1", "--tasks",
                                          "top_eigenvalues k=5 tol=1e-6,hutchinson_trace 100 probes"],
                    "bookkeeping", False),
    "distributed": (["--repeats", "5"], ["--repeats", "1"], "distributed", True),
    "compile": (["--repeats", "5"], ["--quick"], "compile", True),
    "ce_hessian": (["--repeats", "5"], ["--quick"], "ce_hessian", True),
    "estimators": (["--repeats", "3"], ["--quick"], "estimators", True),
    "memory": (["--repeats", "1"], ["--models", "cnn"], "memory", True),
    "operators": (["--repeats", "5"], ["--repeats", "1", "--models", "cnn"], "operators", True),
    "scaling": (["--repeats", "5"], ["--quick"], "scaling", True),
    "scaled_gd": (["--repeats", "5"], ["--repeats", "1"], "scaled_gd", False),
    "sharpness": (["--repeats", "3"], ["--quick", "--repeats", "1"], "sharpness", True),
    "solvers": (["--repeats", "3"], ["--dims", "200", "--repeats", "1"], "solvers", True),
    "sophia": (["--repeats", "7"], ["--repeats", "1", "--k", "2"], "sophia", False),
    "transformer": (["--repeats", "5"], ["--quick"], "transformer", True),
}


# Before/after scripts that compare against another checkout or commit (a worktree path, a
# `curvature_base` copy): not part of the suite, run them by hand or with --only.
ONE_OFF = {"losses_overhead", "overhead_ab"}


def discover(include_one_off: bool = False) -> list[str]:
    """Names ``X`` of every ``benchmarks/bench_X.py``, sorted (without :data:`ONE_OFF` unless asked)."""
    names = sorted(os.path.basename(p)[len("bench_"):-len(".py")] for p in glob.glob(os.path.join(HERE, "bench_*.py")))
    return names if include_one_off else [n for n in names if n not in ONE_OFF]


def command(name: str, quick: bool, out_dir: str) -> tuple[list[str], str, bool]:
    """``(argv, results path, script writes it itself)`` for one script."""
    full, fast, stem, has_out = SCRIPTS.get(name, ([], [], name, False))
    path = os.path.join(out_dir, f"results_{stem}.md")
    argv = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), *(fast if quick else full)]
    if has_out:
        argv += ["--out", path]
    return argv, path, has_out


def run_one(name: str, quick: bool, out_dir: str, timeout: float | None) -> dict:
    argv, path, has_out = command(name, quick, out_dir)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    shown = " ".join(["python", os.path.relpath(argv[1], REPO), *argv[2:]]).replace(out_dir + os.sep, "<out>/")
    print(f"[run_all] {shown}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, stdout, stderr = "timeout", exc.stdout or "", f"timed out after {timeout:.0f} s"
        stdout = stdout.decode() if isinstance(stdout, bytes) else stdout
    wall = time.perf_counter() - t0
    if rc == 0 and not has_out:
        with open(path, "w") as f:
            f.write(stdout)
    tail = "" if rc == 0 else (stderr.strip().splitlines() or [""])[-1][:200]
    print(f"[run_all] {name}: exit {rc}, {wall:.0f} s {tail}", flush=True)
    return {"name": name, "command": shown, "rc": rc, "wall": wall, "path": path, "error": tail}


def headline(path: str) -> list[str]:
    """The first ``## `` title, the heading above the first markdown table, and that table."""
    if not os.path.exists(path):
        return ["(no results file)"]
    lines = open(path).read().splitlines()
    title = next((ln for ln in lines if ln.startswith("## ")), None)
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        return [title or "", "(no table)"]
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    heading = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].startswith("#")), None)
    out = [f"*{title[3:].strip()}*", ""] if title and title != heading else []
    if heading:
        out += [re.sub(r"^#+\s*", "", heading), ""]
    return out + lines[start:end]


def summary(runs: list[dict], quick: bool, out_dir: str) -> str:
    lines = ["# Benchmark summary", "",
             f"Generated by `python benchmarks/run_all.py{' --quick' if quick else ''}`"
             f"{' (quick settings: few repeats, small sizes; for smoke checks, not for quoting)' if quick else ''}. "
             "Each script ran in its own process, one at a time, one thread; every number below is from the "
             "script's own results file, which has the details.", "",
             "| script | exit | wall s | command | results |", "| --- | --- | ---: | --- | --- |"]
    for r in runs:
        status = "ok" if r["rc"] == 0 else f"**{r['rc']}** {r['error']}"
        lines.append(f"| bench_{r['name']}.py | {status} | {r['wall']:.0f} | `{r['command']}` | "
                     f"{os.path.relpath(r['path'], out_dir)} |")
    for r in runs:
        lines += ["", f"## bench_{r['name']}.py", ""] + headline(r["path"])
    return "\n".join(lines) + "\n"


MARKERS = re.compile(r"<!-- BEGIN generated:(?P<name>[\w.-]+) -->\n")


def generated_block(payload: dict, source: str) -> str:
    """The markdown between one pair of markers: command, machine, tables, notes of a results JSON."""
    lines = [f"<!-- generated by benchmarks/run_all.py from {source}; edit the script, not this block -->",
             f"`{payload['command']}` ({payload['machine']}; {payload['date']}).", ""]
    for t in payload["tables"]:
        lines += [markdown_table(t), ""]
    if payload.get("notes"):
        lines += [f"- {n}" for n in payload["notes"]] + [""]
    return "\n".join(lines)


def regenerate(md_path: str, json_dir: str, target: str | None = None) -> tuple[list[str], list[str]]:
    """Rewrite the generated blocks of ``md_path`` from ``json_dir/results_*.json`` into ``target``.

    ``target`` defaults to ``md_path``.  Returns ``(names inserted, names without markers)``.
    A marker pair without a JSON in ``json_dir`` keeps its block as it was (a partial
    ``--only`` run leaves the other blocks alone).
    """
    payloads = {}
    for path in sorted(glob.glob(os.path.join(json_dir, "results_*.json"))):
        with open(path) as f:
            payload = json.load(f)
        if not isinstance(payload, dict) or "tables" not in payload:
            continue
        name = payload.get("name") or os.path.basename(path)[len("results_"):-len(".json")]
        payloads[name] = (payload, os.path.relpath(path, REPO))
    with open(md_path) as f:
        text = f.read()
    inserted = []
    for name in dict.fromkeys(MARKERS.findall(text)):
        if name in payloads and markers(name)[1] in text:
            payload, source = payloads[name]
            text = replace_block(text, name, generated_block(payload, source))
            inserted.append(name)
    with open(target or md_path, "w") as f:
        f.write(text)
    return inserted, sorted(set(payloads) - set(inserted))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small settings (smoke run of every script)")
    ap.add_argument("--out-dir", default=None, help="where results_*.md and SUMMARY.md go "
                                                    "[benchmarks/; with --quick: benchmarks/quick/]")
    ap.add_argument("--only", default=None, help="comma-separated script names (bench_NAME.py), e.g. transformer")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per script (default: none; with --quick: 900)")
    ap.add_argument("--regen-only", action="store_true",
                    help="run nothing: rebuild the generated tables from the results_*.json in --out-dir")
    ap.add_argument("--benchmarks-md", default=None,
                    help="file whose generated blocks are rebuilt [BENCHMARKS.md; with --quick: "
                         "<out-dir>/BENCHMARKS.md, a copy of BENCHMARKS.md]")
    args = ap.parse_args(argv)
    out_dir = os.path.abspath(args.out_dir or (os.path.join(HERE, "quick") if args.quick else HERE))
    os.makedirs(out_dir, exist_ok=True)
    source_md = os.path.join(REPO, "BENCHMARKS.md")
    target_md = args.benchmarks_md or (os.path.join(out_dir, "BENCHMARKS.md") if args.quick else source_md)
    if args.benchmarks_md:
        source_md = args.benchmarks_md
    if args.regen_only:
        inserted, unplaced = regenerate(source_md, out_dir, target_md)
        print(f"[run_all] {os.path.relpath(target_md)}: regenerated {', '.join(inserted) or 'nothing'}"
              + (f"; no markers for {', '.join(unplaced)}" if unplaced else ""))
        return 0 if inserted else 1
    if args.quick and args.timeout is None:
        args.timeout = 900.0
    names = discover(include_one_off=bool(args.only))
    if args.only:
        wanted = args.only.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"no benchmarks/bench_{unknown[0]}.py; scripts: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    runs = [run_one(n, args.quick, out_dir, args.timeout) for n in names]
    path = os.path.join(out_dir, "SUMMARY.md")
    with open(path, "w") as f:
        f.write(summary(runs, args.quick, out_dir))
    print(f"[run_all] wrote {path}")
    inserted, unplaced = regenerate(source_md, out_dir, target_md)
    print(f"[run_all] {os.path.relpath(target_md)}: regenerated {', '.join(inserted) or 'nothing'}"
          + (f"; no markers for {', '.join(unplaced)}" if unplaced else ""))
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
