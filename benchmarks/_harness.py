"""What every benchmark script needs and should not copy: threads, clocks, interleaved repeats,
statistics, peak memory, one process per case, and the results JSON.

Timing on a shared machine is only meaningful as a ratio measured in the same run, so the
helpers here never return one absolute time alone:

* :func:`interleave` times several callables in one process, round-robin (``a b c a b c``),
  so that a load change on the machine hits every variant alike; it returns :class:`Stats`
  (median, min, max over the repeats).
* :func:`run_cases` runs each case in its *own* process (``python script.py --case JSON``),
  ``repeats`` rounds over all cases (``a b c a b c``), so that no case inherits another's
  allocator state, caches or peak memory.  A case prints one line ``@@RESULT {json}``
  (:func:`emit`); the runner collects those dicts per case.
* :class:`PeakMemory` measures the peak memory of a region: on CUDA the allocator's peak,
  on Linux the process's resident set (the kernel's high-water mark ``VmHWM``, reset with
  ``/proc/self/clear_refs`` at the start of the region), both minus what was in use when the
  region began.

The results JSON (:func:`write_results`) is what ``run_all.py`` renders into BENCHMARKS.md: a
title, the reproducing command, and tables (``columns`` + ``rows`` of strings) with notes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

RESULT_TAG = "@@RESULT "
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_thread(threads: int = 1) -> None:
    """``torch.set_num_threads(threads)`` (and the interop pool where it can still be set)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already used in this process
        pass


def clock(kind: str = "wall") -> Callable[[], float]:
    """``time.perf_counter`` for ``"wall"``, ``time.process_time`` (CPU seconds of this process) for ``"cpu"``.

    With one thread, CPU seconds are what an idle machine's wall clock would show; on a busy
    shared machine they are the steadier measure.  Never use ``"cpu"`` on CUDA (the GPU's
    time is not the process's).
    """
    if kind == "wall":
        return time.perf_counter
    if kind == "cpu":
        return time.process_time
    raise ValueError(f"clock must be 'wall' or 'cpu', got {kind!r}.")


def synchronize() -> None:
    """Wait for queued CUDA work (no-op without CUDA), so a timer sees the finished product."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Stats:
    """Median, min and max of ``n`` measurements (seconds, bytes, ...)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> "Stats":
        v = [float(x) for x in values]
        if not v:
            raise ValueError("Stats.of needs at least one value.")
        return cls(statistics.median(v), min(v), max(v), len(v))

    def scaled(self, factor: float) -> "Stats":
        return Stats(self.median * factor, self.min * factor, self.max * factor, self.n)

    def fmt(self, digits: int = 2, unit: str = "") -> str:
        """``"1.23 (1.20-1.31)"``: the median, then min-max when there was more than one value."""
        med = f"{self.median:.{digits}f}{unit}"
        if self.n == 1:
            return med
        return f"{med} ({self.min:.{digits}f}-{self.max:.{digits}f})"


def ratio_stats(num: Sequence[float], den: Sequence[float]) -> Stats:
    """Stats of the per-round ratios ``num[i] / den[i]`` (both measured in round ``i``)."""
    if len(num) != len(den):
        raise ValueError(f"ratio_stats needs paired rounds, got {len(num)} and {len(den)} values.")
    return Stats.of(a / b for a, b in zip(num, den))


def interleave(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 1,
               timer: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of each function, ``repeats`` rounds round-robin after ``warmup`` untimed rounds.

    Returns the raw per-round times (``{name: [t_round0, t_round1, ...]}``) so that ratios can
    be formed per round (:func:`ratio_stats`) as well as per median (:meth:`Stats.of`).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            synchronize()
            t0 = timer()
            fn()
            synchronize()
            times[k].append(timer() - t0)
    return times


def timed(fn: Callable[[], object], timer: Callable[[], float] = time.perf_counter) -> tuple[object, float]:
    """``(fn(), seconds)`` for one call."""
    synchronize()
    t0 = timer()
    out = fn()
    synchronize()
    return out, timer() - t0


# ------------------------------------------------------------------------- memory
def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Current resident set size of this process in MiB (Linux), else ``None``."""
    kib = _proc_status_kib("VmRSS")
    return None if kib is None else kib / 1024.0


class PeakMemory:
    """``with PeakMemory(device) as m: ...``; then ``m.mib`` = peak memory of the region above its start, MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors
    only).  CPU: the resident-set high-water mark (``VmHWM``) after resetting it through
    ``/proc/self/clear_refs``, minus the resident set at the start (everything the process
    touches: tensors, autograd buffers, allocator slack).  Where neither is available
    ``m.mib`` is ``None``.  Run one region per process when comparing variants (the CPU
    allocator may keep freed pages resident, which hides a later region's allocations):
    :func:`run_cases` does that.
    """

    def __init__(self, device=None) -> None:
        import torch

        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
                self._start = _proc_status_kib("VmRSS")
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        elif self._start is not None:
            peak = _proc_status_kib("VmHWM")
            self.mib = None if peak is None else (peak - self._start) / 1024.0


# ------------------------------------------------------------------ process per case
def emit(result: dict) -> None:
    """Print one case's result for :func:`run_cases` (one line, JSON, tagged)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def add_case_args(ap) -> None:
    """The options every case-per-process script takes: ``--out`` and the hidden ``--case`` of :func:`run_case`."""
    ap.add_argument("--out", default=None, help="markdown file (a .json beside it)")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)


def served_case(args, run_one) -> bool:
    """In a case process (``--case JSON`` given): run ``run_one(case)``, :func:`emit` it and return ``True``."""
    if args.case is None:
        return False
    emit(run_one(json.loads(args.case)))
    return True


def case_key(case: dict) -> str:
    """A stable name for a case dict (its JSON with sorted keys)."""
    return json.dumps(case, sort_keys=True)


def subprocess_env(threads: int = 1) -> dict:
    """The environment of a case process: this checkout first on ``PYTHONPATH``, ``threads`` OpenMP threads."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_case(script: str, case: dict, *, timeout: float | None = None, extra_args: Sequence[str] = ()) -> dict:
    """Run ``python script --case JSON`` once; its ``@@RESULT`` dict, or ``{"error": ...}`` on failure."""
    argv = [sys.executable, script, "--case", json.dumps(case), *extra_args]
    try:
        proc = subprocess.run(argv, cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    results = [json.loads(ln[len(RESULT_TAG):]) for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not results:
        tail = (proc.stderr.strip().splitlines() or ["no result printed"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:300]}"}
    return results[-1]


def run_cases(script: str, cases: Sequence[dict], repeats: int, *, timeout: float | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, list[dict]]:
    """Each case in its own process, ``repeats`` rounds round-robin over the cases.

    Returns ``{case_key(case): [result of round 0, round 1, ...]}``; a failed run's entry is
    ``{"error": ...}`` (the other rounds still run).
    """
    out: dict[str, list[dict]] = {case_key(c): [] for c in cases}
    for r in range(repeats):
        for c in cases:
            res = run_case(script, c, timeout=timeout)
            out[case_key(c)].append(res)
            if log is not None:
                brief = res.get("error") or ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                      for k, v in res.items() if not isinstance(v, (list, dict)))
                log(f"  [round {r + 1}/{repeats}] {json.dumps(c)}: {brief}")
    return out


def ok_results(results: list[dict]) -> list[dict]:
    return [r for r in results if "error" not in r]


# --------------------------------------------------------------------- results JSON
def machine() -> str:
    """One line: CPU count, torch version, threads, device."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s), {dev}")


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], *, title: str = "",
          notes: Sequence[str] = (), align: str | None = None) -> dict:
    """A results table: ``columns``, ``rows`` (cells are str()-ed), optional title / notes / alignment.

    ``align``: one character per column, ``l`` or ``r`` (default: first column left, others right).
    """
    rows = [[str(c) for c in r] for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"row {r} has {len(r)} cells for {len(columns)} columns.")
    align = align or "l" + "r" * (len(columns) - 1)
    if len(align) != len(columns):
        raise ValueError(f"align {align!r} does not have one letter per column ({len(columns)}).")
    return {"title": title, "columns": list(columns), "rows": rows, "notes": list(notes), "align": align}


def markdown_table(t: dict) -> str:
    """Render a :func:`table` dict as markdown (title line, table, bullet notes)."""
    sep = ["---:" if a == "r" else "---" for a in t.get("align", "l" + "r" * (len(t["columns"]) - 1))]
    lines = [f"**{t['title']}**", ""] if t.get("title") else []
    lines += ["| " + " | ".join(t["columns"]) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in t["rows"]]
    if t.get("notes"):
        lines += [""] + [f"- {n}" for n in t["notes"]]
    return "\n".join(lines)


def write_results(path_md: str | None, name: str, title: str, command: str, tables: Sequence[dict],
                  notes: Sequence[str] = ()) -> dict:
    """Write ``results_<name>.json`` beside ``path_md`` (and the markdown itself); returns the payload.

    The JSON is what ``run_all.py`` renders into BENCHMARKS.md between
    ``<!-- BEGIN generated:<name> -->`` and ``<!-- END generated:<name> -->``.
    """
    payload = {"name": name, "title": title, "command": command, "machine": machine(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tables": list(tables),
               "notes": list(notes)}
    text = render_markdown(payload)
    print(text)
    if path_md:
        old = open(path_md).read() if os.path.exists(path_md) else ""
        with open(path_md, "w") as f:
            f.write(replace_block(old, name, text))
        base = path_md[:-3] if path_md.endswith(".md") else path_md
        with open(base + ".json", "w") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
    return payload


def markers(name: str) -> tuple[str, str]:
    """The marker lines around a generated block named ``name``."""
    return f"<!-- BEGIN generated:{name} -->", f"<!-- END generated:{name} -->"


def replace_block(text: str, name: str, body: str) -> str:
    """``text`` with the block between ``name``'s markers replaced by ``body``.

    Without markers in ``text`` the marked block goes first and ``text`` follows unchanged
    (a results file that other scripts or people also write to keeps their sections).
    """
    begin, end = markers(name)
    body = body if body.endswith("\n") else body + "\n"
    i = text.find(begin + "\n")
    j = text.find(end, i + 1) if i >= 0 else -1
    if i < 0 or j < 0:
        return f"{begin}\n{body}{end}\n" + ("\n" + text if text else "")
    return text[:i + len(begin) + 1] + body + text[j:]


def render_markdown(payload: dict, heading: str = "## ") -> str:
    """The markdown of a results payload: heading, command, machine, tables, notes."""
    lines = [f"{heading}{payload['title']}", "",
             f"`{payload['command']}` ({payload['machine']}; {payload['date']})."]
    for t in payload["tables"]:
        lines += ["", markdown_table(t)]
    if payload.get("notes"):
        lines += [""] + [f"- {n}" for n in payload["notes"]]
    return "\n".join(lines) + "\n"
