"""The verdict of the GPU check (``benchmarks/gpu_check.py``): pure functions over records, run in the CPU
suite so that the checks a GPU machine relies on are themselves tested without one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
_spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
assert _spec is not None and _spec.loader is not None
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gpu_check", gpu_check)  # dataclasses look their module up by name
_spec.loader.exec_module(gpu_check)


def _record(i: int, worker: str | None, device: str | None, seconds: float = 1.0, outcome: str = "passed",
            ok: bool = True):
    return SimpleNamespace(test_id=f"t{i}", worker=worker, device=device, duration_s=seconds, outcome=outcome, ok=ok)


def _by_name(checks):
    return {c.name: c for c in checks}


def test_one_distinct_gpu_per_worker_passes_and_names_each_placement():
    records = [_record(i, f"gw{i % 2}", f"cuda:0 (GPU {i % 2})") for i in range(6)]
    checks = _by_name(gpu_check.placement_checks(records, workers=2, mode="gpu"))
    assert checks["workers"].ok and "gw0 3, gw1 3" in checks["workers"].detail
    assert checks["pinning"].ok and "gw1 -> cuda:0 (GPU 1)" in checks["pinning"].detail


def test_two_workers_on_one_gpu_fail_pinning():
    records = [_record(i, f"gw{i % 2}", "cuda:0 (GPU 0)") for i in range(4)]
    pinning = _by_name(gpu_check.placement_checks(records, workers=2, mode="gpu"))["pinning"]
    assert not pinning.ok and "gw0 and gw1 share cuda:0 (GPU 0)" in pinning.detail


def test_a_worker_on_two_devices_or_on_the_cpu_fails_pinning_in_gpu_mode():
    records = [_record(0, "gw0", "cuda:0 (GPU 0)"), _record(1, "gw0", "cuda:0 (GPU 1)"), _record(2, "gw1", "cpu")]
    pinning = _by_name(gpu_check.placement_checks(records, workers=2, mode="gpu"))["pinning"]
    assert not pinning.ok
    assert "gw0 ran on 2 devices" in pinning.detail and "gw1 ran on cpu, not a GPU" in pinning.detail


def test_a_worker_without_cases_fails_the_workers_check():
    records = [_record(i, "gw0", "cuda:0 (GPU 0)") for i in range(3)]
    workers = _by_name(gpu_check.placement_checks(records, workers=2, mode="gpu"))["workers"]
    assert not workers.ok and "1 workers recorded cases (gw0), expected 2" in workers.detail


def test_records_without_worker_or_device_and_an_empty_run_fail():
    unnamed = [_record(0, "gw0", None), _record(1, "gw1", "cuda:0 (GPU 1)")]
    assert not _by_name(gpu_check.placement_checks(unnamed, workers=2, mode="gpu"))["workers"].ok
    assert not any(c.ok for c in gpu_check.placement_checks([], workers=1, mode="gpu"))


def test_cpu_mode_accepts_workers_sharing_the_cpu_and_nothing_else():
    shared = [_record(i, f"gw{i % 2}", "cpu") for i in range(4)]
    assert all(c.ok for c in gpu_check.placement_checks(shared, workers=2, mode="cpu"))
    on_gpu = [_record(0, "gw0", "cpu"), _record(1, "gw1", "cuda:0")]
    assert not _by_name(gpu_check.placement_checks(on_gpu, workers=2, mode="cpu"))["pinning"].ok
    with pytest.raises(ValueError, match="mode 'tpu'"):
        gpu_check.placement_checks(shared, workers=2, mode="tpu")


def test_worker_figures_are_per_worker_seconds():
    records = [_record(0, "gw1", "cuda:0 (GPU 1)", 1.0), _record(1, "gw1", "cuda:0 (GPU 1)", 3.0),
               _record(2, "gw0", "cuda:0 (GPU 0)", 2.0)]
    figures = gpu_check.worker_figures(records)
    assert [f.worker for f in figures] == ["gw0", "gw1"]
    assert (figures[1].cases, figures[1].median_s, figures[1].max_s, figures[1].total_s) == (2, 2.0, 3.0, 4.0)


def _result(records, *, complete=True):
    coverage = SimpleNamespace(complete=complete, status="complete" if complete else "partial", recorded=len(records),
                               planned=len(records) + (0 if complete else 1))
    return SimpleNamespace(cases=tuple(records), sequential=(), coverage=coverage)


def test_certification_needs_exit_0_complete_coverage_and_no_error():
    good = [_record(i, "gw0", "cpu") for i in range(3)]
    assert gpu_check.certification_check(_result(good), 0).ok
    assert "pytest exited 1" in gpu_check.certification_check(_result(good), 1).detail
    assert "coverage partial" in gpu_check.certification_check(_result(good, complete=False), 0).detail
    errored = [*good, _record(3, "gw0", "cpu", outcome="error", ok=False)]
    detail = gpu_check.certification_check(_result(errored), 1).detail
    assert "1 records are errors, e.g. t3" in detail and "1 of 4 not certified" in detail


def test_junit_counts_and_a_skipped_device_test_fails(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text('<testsuites><testsuite name="pytest" tests="7" failures="0" errors="0" skipped="1"/>'
                    "</testsuites>")
    counts = gpu_check.read_junit(path)
    assert counts == gpu_check.JunitCounts(tests=7, failures=0, errors=0, skipped=1)
    check = gpu_check.tests_check(counts, 0)
    assert not check.ok and "1 skipped" in check.detail
    assert gpu_check.tests_check(gpu_check.JunitCounts(7, 0, 0, 0), 0).ok
    assert not gpu_check.tests_check(gpu_check.JunitCounts(7, 1, 0, 0), 1).ok
    assert not gpu_check.tests_check(None, 4).ok


def test_the_budget_counts_the_tests_and_the_run_not_the_build():
    timings = {"build": 500.0, "tests": 100.0, "certify": 150.0}
    assert gpu_check.budget_check(timings, budget_s=300, mode="gpu").ok
    over = gpu_check.budget_check({**timings, "certify": 250.0}, budget_s=300, mode="gpu")
    assert not over.ok and "350.0 s" in over.detail
    assert gpu_check.budget_check({**timings, "certify": 250.0}, budget_s=300, mode="cpu").ok


def _run(*violations: tuple[str, ...], complete: bool = True):
    cases = tuple(SimpleNamespace(test_id=f"t{i}", violations=list(v)) for i, v in enumerate(violations))
    return SimpleNamespace(cases=cases, coverage=SimpleNamespace(complete=complete, status="complete" if complete
                                                                 else "partial"))


def test_the_gate_wants_the_collapse_stopped_on_perplexity_and_the_safe_editor_through():
    collapsing = _run(("perplexity ratio 12.4 > 1.5",), ("efficacy 0.00 < 0.90",), ())
    safe = _run((), ())
    check = gpu_check.gate_check(collapsing, 1, safe, 0)
    assert check.ok and "1 of 3 cases failed on perplexity" in check.detail
    # stopped for another reason only: the gate did not see the collapse
    assert "no record of the collapsing run failed on perplexity" in gpu_check.gate_check(
        _run(("efficacy 0.00 < 0.90",)), 1, safe, 0).detail
    assert "the collapsing run exited 0, expected 1" in gpu_check.gate_check(collapsing, 0, safe, 0).detail
    assert "the safe run exited 1, expected 0" in gpu_check.gate_check(collapsing, 1, safe, 1).detail
    assert "the safe run's coverage is partial" in gpu_check.gate_check(collapsing, 1, _run((), complete=False), 0).detail
    unreadable = gpu_check.gate_check(None, 1, None, 0)
    assert not unreadable.ok and "collapsing run left no readable results" in unreadable.detail
