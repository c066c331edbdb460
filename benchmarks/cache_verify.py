"""What verifying the caches costs a warm run: prints figures.

Every cache entry is checked against the digest written with it when it is read (organism weights, second
moments, denominator floors, MEND archives) and a local model's safetensors headers are checked before a
run. This times each check on the entries in the cache (median of ``--repeat`` reads), then times a warm
run's collection and first test (``pytest suites --editor=c-rome --model=tiny-gpt2 --cases=normal
--editsafety-limit=1``) and prints the checks' share of it: the budget is 5 %.

    python benchmarks/cache_verify.py [--repeat 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _median_ms(check: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        check()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _checks(root: Path) -> dict[str, tuple[Callable[[], object], str]]:
    """One check per kind of cache entry present under ``root``: (the check, what it reads)."""
    from editors.storage import file_sha256, safetensors_problem

    checks: dict[str, tuple[Callable[[], object], str]] = {}
    organisms = sorted(p for p in (root / "organisms").glob("tiny-gpt2-*") if p.is_dir())
    if organisms:
        weights = organisms[0] / "model.safetensors"
        checks["organism weights sha256"] = (lambda: file_sha256(weights), f"{weights.stat().st_size} bytes")
        checks["safetensors header (a local model)"] = (lambda: safetensors_problem(weights), "header only")
    stats = sorted((root / "stats").glob("*.safetensors"))
    if stats:
        from safetensors import safe_open

        from editors.stats import StatsKey, read_entry

        path = max(stats, key=lambda p: p.stat().st_size)
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata()
        stats_key = StatsKey(model_identity=meta["model_identity"], layer=int(meta["layer"]), module=meta["module"],
                       n_samples=int(meta["n_samples"]), corpus=meta["corpus"], max_length=int(meta["max_length"]),
                       dtype=meta["dtype"])
        checks["second moment read + verify"] = (lambda: read_entry(path, stats_key), f"{path.stat().st_size} bytes")
    floors = sorted((root / "denominators").glob("*.json"))
    if floors:
        from pytest_editsafety.floor import _valid
        from pytest_editsafety.keyed_cache import read_entry as read_keyed

        floor = floors[0]
        floor_key = json.loads(floor.read_text())["key"]
        checks["denominator floor read + verify"] = (lambda: read_keyed(floor, floor_key, valid=_valid),
                                                     f"{floor.stat().st_size} bytes")
    archives = sorted((root / "mend").glob("*/mend.safetensors"))
    if archives:
        archive = archives[0]
        checks["MEND archive sha256"] = (lambda: file_sha256(archive), f"{archive.stat().st_size} bytes")
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    from pytest_editsafety.cache import cache_root

    root = Path(cache_root(None))
    figures: dict[str, object] = {"cache": str(root), "checks_ms": {}}
    for name, (check, size) in _checks(root).items():
        figures["checks_ms"][name] = {"ms": round(_median_ms(check, args.repeat), 3), "reads": size}

    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pytest", "suites", "--editor=c-rome", "--model=tiny-gpt2", "--cases=normal",
                   "--editsafety-limit=1", "-p", "no:cacheprovider", "-q", f"--editsafety-json={out}/r.json",
                   f"--editsafety-report={out}/r.md"]
        t0 = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=os.environ.copy(), capture_output=True, check=False)
        run_s = time.perf_counter() - t0
    # a run reads one organism, one statistic (per edited layer) and one floor per (editor, model)
    per_run_ms = sum(entry["ms"] for name, entry in figures["checks_ms"].items() if "MEND" not in name)
    figures.update(warm_run_s=round(run_s, 2), checks_per_run_ms=round(per_run_ms, 3),
                   share_of_warm_run=round(per_run_ms / 1000 / run_s, 5))
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"cache {root}")
    for name, entry in figures["checks_ms"].items():
        print(f"  {name:<38} {entry['ms']:>9.3f} ms  ({entry['reads']})")
    print(f"warm run (collection + first test, one c-rome case): {figures['warm_run_s']:.2f} s")
    print(f"checks a run makes: {figures['checks_per_run_ms']:.2f} ms = {100 * figures['share_of_warm_run']:.3f} % "
          f"of it (budget 5 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
