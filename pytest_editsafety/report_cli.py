"""``python -m pytest_editsafety report a.json [b.json ...]``: merge shard results and re-render the report.

The verdict and exit code are those of the recorded run (records are not re-judged): 0 when every planned
test is recorded and certified and nothing regressed against ``--baseline``; 1 when it is not certified,
when it is partial, and when the files do not add up to their plan (nothing is written then, unless
``--allow-partial`` asks for a PARTIAL report, still exit 1); 4 for usage errors (a missing or malformed
file, shards of different plans or conditions, ``--json`` and ``--md`` naming one file), with a message on
stderr naming the file. This is how multi-machine runs sharded with pytest-split become one certificate.

``main`` takes the arguments after the word ``report``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from pytest_editsafety.output_lock import OutputsInUseError, holding_outputs
from pytest_editsafety.report import write_outputs
from pytest_editsafety.results import ResultsError, RunResult, merge, read_result, shown_ids
from pytest_editsafety.results.journal import IN_PROGRESS, journal_path, recover_from_journal

__all__ = ["NOT_CERTIFIED_EXIT", "USAGE_ERROR", "main"]

# pytest's exit codes, so the CLI and the plugin agree
NOT_CERTIFIED_EXIT = 1
USAGE_ERROR = 4
DEFAULT_JSON = "reports/editsafety.json"
DEFAULT_MD = "reports/editsafety.md"

log = logging.getLogger(__name__)


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits with status 2 on bad arguments; this CLI promises 4 for every usage error
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m pytest_editsafety report",
        description="Merge pytest-editsafety results (one file per shard) and render the certification report.",
    )
    parser.add_argument("results", nargs="+", metavar="RESULTS.json", help="results files; several are merged")
    parser.add_argument("--baseline", metavar="BASELINE.json", help="a previous run; regressions fail the report")
    parser.add_argument("--allow-missing", action="store_true",
                        help="tests of --baseline that the results lack are listed, not regressions")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write a PARTIAL report (exit 1) for results that do not cover their whole plan "
                             "(a shard missing, a narrowed or interrupted run, a file without a plan) instead "
                             "of refusing them")
    parser.add_argument("--json", dest="json_out", default=DEFAULT_JSON, metavar="OUT.json",
                        help=f"where to write the (merged) results (default {DEFAULT_JSON})")
    parser.add_argument("--md", dest="md_out", default=DEFAULT_MD, metavar="OUT.md",
                        help=f"where to write the markdown report (default {DEFAULT_MD})")
    return parser


def _read(path: str) -> RunResult:
    """A results file; an in-progress report (its run still going, or killed) with the records its run
    journaled beside it, so a crashed run's finished tests are not lost."""
    result = read_result(path)
    if any(session.interrupted == IN_PROGRESS for session in result.sessions):
        recovered = recover_from_journal(result, journal_path(path))
        if recovered is None:
            log.warning("%s is the report of a run that has not finished, and no record journal is beside it", path)
        else:
            sys.stderr.write(f"{path}: the report of a run that has not finished; {recovered.note}\n")
            result = recovered.result
    return result


def _load(paths: Sequence[str]) -> RunResult:
    results = [_read(path) for path in paths]
    return merge(results, sources=list(paths))


def _refusal(result: RunResult, paths: Sequence[str]) -> str:
    """Why results that do not cover their plan are not rendered, naming what is missing."""
    coverage = result.coverage
    what = "these shards do not add up to their plan" if len(paths) > 1 else f"{paths[0]} does not cover its plan"
    lines = [f"error: {what}: {coverage.summary()}"]
    if coverage.missing:
        lines.append(f"  missing test ids: {shown_ids(coverage.missing, 50)}")
    lines.append("  give every shard's results, or --allow-partial to write a PARTIAL report (exit 1)")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        if Path(args.json_out).resolve() == Path(args.md_out).resolve():
            raise _UsageError(f"--json and --md name the same file {args.json_out}: the results and the report "
                              f"need a file each")
        result = _load(args.results)
        baseline = read_result(args.baseline) if args.baseline else None
        if not result.coverage.complete and not args.allow_partial:
            sys.stderr.write(_refusal(result, args.results))
            return NOT_CERTIFIED_EXIT
        try:
            with holding_outputs((args.json_out, args.md_out), command=shlex.join(["report", *args.results])):
                outputs = write_outputs(result, args.json_out, args.md_out, baseline=baseline,
                                        allow_missing=args.allow_missing)
        except OutputsInUseError as err:
            raise _UsageError(f"error: {err}") from None
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    except _UsageError as err:
        sys.stderr.write(f"{err}\n")
        return USAGE_ERROR
    except ResultsError as err:  # names the file (and the JSON path) that is wrong
        sys.stderr.write(f"error: {err}\n")
        return USAGE_ERROR
    except OSError as err:
        sys.stderr.write(f"error: cannot write the report: {err}\n")
        return USAGE_ERROR
    certified = sum(r.ok for r in result.cases)
    line = f"{outputs.verdict}: {certified}/{len(result.cases)} cases certified"
    if result.batches:
        line = (f"{outputs.verdict}: {sum(r.ok for r in result.batches)}/{len(result.batches)} batches certified "
                f"({sum(m.ok for m in result.edited_cases)}/{len(result.edited_cases)} member cases)")
    if result.sequential:
        line += f", {sum(r.ok for r in result.sequential)}/{len(result.sequential)} sequential runs"
    if outputs.regressions:
        line += f", {len(outputs.regressions)} baseline regression(s)"
    if not result.coverage.complete:
        line += f"; {result.coverage.summary()}"
    sys.stdout.write(f"{line} -> {outputs.md_path} ({outputs.json_path})\n")
    return outputs.exit_code
