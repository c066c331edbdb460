"""The verdict of the GPU check (issue 15), read from what ``benchmarks/gpu_check.sh`` leaves behind.

    python benchmarks/gpu_check.py RESULTS.json --workers N --mode gpu --certify-exit 0 \\
        --tests-junit gpu-tests.xml --tests-exit 0 --timing build=40.1 --timing tests=25.3 --timing certify=61.0

Prints one line per check and the figures (per-case seconds, the device each worker ran on, the time of each
step) and exits 1 when any check fails. The checks:

* ``gpu tests``: ``tests/gpu`` ran every test (none skipped: a skipped module would hide everything) and all
  passed;
* ``certification``: the pytest run exited 0 (``c-rome`` certifies every ``normal`` case of the organism on the
  CPU, so a device that does not is a finding), its coverage is complete and no record is an error;
* ``workers``: exactly ``--workers`` workers recorded cases (``-n`` = GPU count: every GPU took part), and
  every record names its worker and device;
* ``pinning``: each worker ran on one device, no two workers on the same one, every device a GPU
  (``--mode cpu``: every device the CPU, shared by the workers);
* ``budget``: the steps after the organism build took at most ``--budget-s`` (300 s) (``--mode cpu``: reported
  only; two shared cores say nothing about a GPU's time);
* ``gate`` (with ``--gate``): the CI gate on the device, a collapsing editor stopped (exit 1, perplexity among
  its reasons) and a safe one let through (exit 0), both runs complete.

The functions are pure (records in, checks out) so that the normal CPU suite tests them
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

DEFAULT_BUDGET_S = 300.0
MODES = ("gpu", "cpu")
# the steps that count against the budget: the organism build is a one-time cost of a bare machine
# (``gate``, an optional extra, is timed and printed but not budgeted: the issue sized the check without it)
BUDGETED_STEPS = ("tests", "certify")


class Placed(Protocol):
    """What the checks read of a record (``pytest_editsafety.results.CaseRecord``)."""

    test_id: str
    worker: str | None
    device: str | None
    duration_s: float
    outcome: str


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class WorkerFigures:
    worker: str
    devices: tuple[str, ...]
    cases: int
    median_s: float
    max_s: float
    total_s: float


@dataclass(frozen=True)
class JunitCounts:
    tests: int
    failures: int
    errors: int
    skipped: int


def worker_figures(records: Iterable[Placed]) -> list[WorkerFigures]:
    """Per worker (in name order): the devices its records name, its case count and per-case seconds."""
    by_worker: dict[str, list[Placed]] = {}
    for record in records:
        by_worker.setdefault(record.worker or "?", []).append(record)
    out = []
    for worker in sorted(by_worker):
        mine = by_worker[worker]
        seconds = [r.duration_s for r in mine]
        out.append(WorkerFigures(
            worker=worker,
            devices=tuple(sorted({r.device or "?" for r in mine})),
            cases=len(mine),
            median_s=statistics.median(seconds),
            max_s=max(seconds),
            total_s=sum(seconds),
        ))
    return out


def placement_checks(records: Sequence[Placed], *, workers: int, mode: str) -> list[Check]:
    """The ``workers`` and ``pinning`` checks over a run's case records."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not records:
        return [Check("workers", False, "the run left no case records"),
                Check("pinning", False, "no records to read devices from")]
    unnamed = [r.test_id for r in records if not r.worker or not r.device]
    figures = worker_figures(records)
    names = [f.worker for f in figures]
    checks = []
    if unnamed:
        checks.append(Check("workers", False, f"{len(unnamed)} records name no worker or device, e.g. {unnamed[0]}"))
    elif len(figures) != workers:
        checks.append(Check("workers", False, f"{len(figures)} workers recorded cases ({', '.join(names)}), "
                                              f"expected {workers} (-n {workers})"))
    else:
        checks.append(Check("workers", True, f"{workers} workers recorded cases: "
                                             + ", ".join(f"{f.worker} {f.cases}" for f in figures)))

    problems = [f"{f.worker} ran on {len(f.devices)} devices ({', '.join(f.devices)})"
                for f in figures if len(f.devices) != 1]
    devices = {f.worker: f.devices[0] for f in figures if len(f.devices) == 1}
    if mode == "gpu":
        problems += [f"{worker} ran on {device}, not a GPU" for worker, device in devices.items()
                     if not device.startswith("cuda")]
        holders: dict[str, list[str]] = {}
        for worker, device in devices.items():
            holders.setdefault(device, []).append(worker)
        problems += [f"{' and '.join(ws)} share {device}" for device, ws in sorted(holders.items()) if len(ws) > 1]
    else:
        problems += [f"{worker} ran on {device}, expected the CPU" for worker, device in devices.items()
                     if device != "cpu"]
    placed = ", ".join(f"{worker} -> {device}" for worker, device in devices.items())
    if problems:
        checks.append(Check("pinning", False, "; ".join(problems)))
    elif mode == "gpu":
        checks.append(Check("pinning", True, f"one distinct GPU per worker: {placed}"))
    else:
        checks.append(Check("pinning", True, f"CPU mode, every worker on the CPU (distinctness not checked): {placed}"))
    return checks


def certification_check(result: Any, exit_code: int) -> Check:
    """The ``certification`` check: exit 0, coverage complete, no record an error (``result``: a RunResult)."""
    records = (*result.cases, *result.sequential)
    errors = [r.test_id for r in records if r.outcome == "error"]
    failed = [r.test_id for r in records if not r.ok]
    coverage = result.coverage
    problems = []
    if exit_code != 0:
        problems.append(f"pytest exited {exit_code}")
    if not coverage.complete:
        problems.append(f"coverage {coverage.status} ({coverage.recorded} of {coverage.planned} planned tests)")
    if errors:
        problems.append(f"{len(errors)} records are errors, e.g. {errors[0]}")
    if failed:
        problems.append(f"{len(failed)} of {len(records)} not certified, e.g. {', '.join(failed[:3])}")
    if problems:
        return Check("certification", False, "; ".join(problems))
    return Check("certification", True, f"certified, {len(records)} records, coverage complete")


def gate_check(collapsing: Any, collapsing_exit: int, safe: Any, safe_exit: int) -> Check:
    """The ``gate`` check (``--gate``): the run of an editor that collapses the model failed (exit 1) with
    perplexity damage among its reasons, and the run of one that does not passed (exit 0), coverage complete in
    both (``collapsing``, ``safe``: RunResults, None when unreadable)."""
    from pytest_editsafety.bounds import violation_topic

    problems = []
    if collapsing is None:
        problems.append("the collapsing run left no readable results")
    else:
        damaged = [r.test_id for r in collapsing.cases if any(violation_topic(v) == "perplexity" for v in r.violations)]
        if collapsing_exit != 1:
            problems.append(f"the collapsing run exited {collapsing_exit}, expected 1")
        if not damaged:
            problems.append("no record of the collapsing run failed on perplexity")
        if not collapsing.coverage.complete:
            problems.append(f"the collapsing run's coverage is {collapsing.coverage.status}")
    if safe is None:
        problems.append("the safe run left no readable results")
    else:
        if safe_exit != 0:
            problems.append(f"the safe run exited {safe_exit}, expected 0")
        if not safe.coverage.complete:
            problems.append(f"the safe run's coverage is {safe.coverage.status}")
    if problems:
        return Check("gate", False, "; ".join(problems))
    return Check("gate", True, f"stopped: {len(damaged)} of {len(collapsing.cases)} cases failed on perplexity; "
                               f"passed: {len(safe.cases)} cases certified")


def read_junit(path: str | Path) -> JunitCounts:
    """The totals of a pytest ``--junitxml`` file (one or several test suites)."""
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        raise ValueError(f"{path}: no <testsuite> element")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, "0"))
    return JunitCounts(**total)


def tests_check(counts: JunitCounts | None, exit_code: int, *, min_tests: int = 1) -> Check:
    """The ``gpu tests`` check: every test ran (a skip means the device was not there) and passed."""
    if counts is None:
        return Check("gpu tests", False, f"no junit report (pytest exited {exit_code})")
    ran = counts.tests - counts.skipped
    detail = (f"{ran} passed" if not (counts.failures or counts.errors)
              else f"{counts.failures} failed, {counts.errors} errors of {counts.tests}")
    problems = []
    if exit_code != 0:
        problems.append(f"pytest exited {exit_code}")
    if counts.skipped:
        problems.append(f"{counts.skipped} skipped (no device?)")
    if counts.tests < min_tests:
        problems.append(f"{counts.tests} tests, expected at least {min_tests}")
    if counts.failures or counts.errors:
        problems.append(detail)
    return Check("gpu tests", not problems, "; ".join(problems) if problems else detail)


def budget_check(timings: Mapping[str, float], *, budget_s: float, mode: str) -> Check:
    steps = [step for step in BUDGETED_STEPS if step in timings]
    spent = sum(timings[step] for step in steps)
    detail = f"{spent:.1f} s for {' + '.join(steps) or 'no step'} (budget {budget_s:.0f} s)"
    if mode == "cpu":
        return Check("budget", True, detail + "; CPU mode, reported only")
    return Check("budget", spent <= budget_s, detail)


def _timing(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not sep or not name or seconds < 0:
        raise argparse.ArgumentTypeError(f"--timing {text!r}: expected STEP=SECONDS")
    return name, seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the certification run's --editsafety-json file")
    parser.add_argument("--workers", type=int, required=True, help="the run's -n")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--certify-exit", type=int, required=True, help="the certification run's exit code")
    parser.add_argument("--tests-junit", type=Path, help="tests/gpu's --junitxml file")
    parser.add_argument("--tests-exit", type=int, default=0, help="tests/gpu's exit code")
    parser.add_argument("--timing", type=_timing, action="append", default=[], help="STEP=SECONDS, repeatable")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S)
    parser.add_argument("--gate", nargs=4, metavar=("COLLAPSING_JSON", "COLLAPSING_EXIT", "SAFE_JSON", "SAFE_EXIT"),
                        help="the gate runs' results and exit codes (gpu_check.sh --gate)")
    args = parser.parse_args(argv)
    gate_exits: tuple[int, int] | None = None
    if args.gate is not None:
        try:
            gate_exits = (int(args.gate[1]), int(args.gate[3]))
        except ValueError:
            parser.error(f"--gate {' '.join(args.gate)}: the exit codes must be integers")

    from pytest_editsafety.results import ResultsError, read_result

    checks: list[Check] = []
    if args.tests_junit is not None:
        try:
            counts: JunitCounts | None = read_junit(args.tests_junit)
        except (OSError, ValueError, ElementTree.ParseError) as err:
            print(f"cannot read {args.tests_junit}: {err}", file=sys.stderr)
            counts = None
        checks.append(tests_check(counts, args.tests_exit))
    result = None
    try:
        result = read_result(args.results)
    except (OSError, ResultsError) as err:
        checks.append(Check("certification", False, f"cannot read {args.results}: {err}"))
    if result is not None:
        checks.append(certification_check(result, args.certify_exit))
        checks += placement_checks(result.cases, workers=args.workers, mode=args.mode)
    if gate_exits is not None:
        gate_results = []
        for path in (args.gate[0], args.gate[2]):
            try:
                gate_results.append(read_result(path))
            except (OSError, ResultsError) as err:
                print(f"cannot read {path}: {err}", file=sys.stderr)
                gate_results.append(None)
        checks.append(gate_check(gate_results[0], gate_exits[0], gate_results[1], gate_exits[1]))
    timings = dict(args.timing)
    checks.append(budget_check(timings, budget_s=args.budget_s, mode=args.mode))

    if result is not None and result.cases:
        seconds = [r.duration_s for r in result.cases]
        print(f"per-case seconds over {len(seconds)} cases: median {statistics.median(seconds):.3f}, "
              f"max {max(seconds):.3f}, sum {sum(seconds):.1f}")
        for f in worker_figures(result.cases):
            print(f"  {f.worker:>5}  {', '.join(f.devices):<24} {f.cases:3d} cases  median {f.median_s:.3f} s  "
                  f"max {f.max_s:.3f} s  sum {f.total_s:.1f} s")
    if timings:
        print("steps: " + ", ".join(f"{step} {seconds:.1f} s" for step, seconds in timings.items()))
    for check in checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
    failed = [c.name for c in checks if not c.ok]
    print(f"GPU check ({args.mode} mode): " + (f"FAILED ({', '.join(failed)})" if failed else "all checks passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
