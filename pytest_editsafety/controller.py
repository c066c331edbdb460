"""The controller's side of a run: certification records in (from the workers' test reports), the certificate
out (``editsafety.json`` and ``editsafety.md``) and the exit code.

Per-test records travel on the test report's ``user_properties`` as plain data (pytest-cov's pattern), so the
controller alone writes the report, whether the tests ran in this process or on xdist workers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pytest

log = logging.getLogger(__name__)

__all__ = ["META_PROPERTY", "RECORD_PROPERTY", "ControllerHooks", "RunRecords", "absorb_meta", "build_result",
           "outcome_properties", "properties"]

RECORD_PROPERTY = "editsafety_record"
META_PROPERTY = "editsafety_meta"


def outcome_properties(outcome: Any) -> list[tuple[str, Any]]:
    """The ``user_properties`` entries that carry a test's record and metadata to the controller."""
    return [(RECORD_PROPERTY, outcome.record), (META_PROPERTY, outcome.meta)]


@dataclass
class RunRecords:
    """What the controller gathers during the run (it alone writes the report)."""

    started: datetime
    t0: float
    baseline: Any = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)
    hparams: dict[str, dict[str, str]] = field(default_factory=dict)
    corpora: dict[str, tuple[str, str]] = field(default_factory=dict)
    hardware: set[str] = field(default_factory=set)
    seen: bool = False
    outputs: Any = None
    write_error: str | None = None


_ID_IN_NODEID = re.compile(r"\[([^\[\]]*)\](?:@[^\[\]]*)?$")


def properties(report: pytest.TestReport, name: str) -> list[Any]:
    return [value for key, value in getattr(report, "user_properties", ()) if key == name]


def _short(longrepr: Any) -> str:
    text = str(longrepr or "").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    # pytest puts the exception line ("E   ...") last; a crash report is a single line
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[-1][1:].strip() if errors else lines[-1])[:300]


def _on_report(plan: Any, controller: RunRecords, report: pytest.TestReport) -> None:
    for meta in properties(report, META_PROPERTY):
        absorb_meta(controller, meta)
    records = properties(report, RECORD_PROPERTY)
    if records:
        test_id = records[-1].get("test_id")
    elif "editsafety" in getattr(report, "keywords", {}) or report.when == "???":
        # a certification test that attached nothing (setup error) or whose worker died (xdist keeps no
        # keywords then): its id is the parametrization in the node id, before xdist's "@group" suffix
        match = _ID_IN_NODEID.search(report.nodeid)
        test_id = match.group(1) if match else None
    else:
        return
    item = plan.item(test_id) if isinstance(test_id, str) else None
    if item is None:
        return
    controller.seen = True
    known = controller.records.get(item.test_id)
    if records and report.when == "call":
        record = dict(records[-1])
        if report.failed and record.get("outcome") == "passed":
            record["outcome"] = "failed"
        controller.records[item.test_id] = record
    elif report.failed:  # setup or teardown errors, a call that failed before attaching, a dead worker
        from pytest_editsafety.plan import error_record

        if known is not None:
            known["outcome"] = "error"
        else:
            # xdist reports a test whose worker died with when="???"
            why = ("the worker running this test crashed" if report.when == "???"
                   else f"{report.when}: {_short(report.longrepr)}")
            controller.records[item.test_id] = error_record(plan, item, why, duration_s=float(report.duration or 0.0))


def absorb_meta(controller: RunRecords, meta: Any) -> None:
    if not isinstance(meta, dict):
        return
    model, editor = meta.get("model"), meta.get("editor")
    if isinstance(model, str) and isinstance(meta.get("identity"), str):
        controller.identities[model] = meta["identity"]
    if isinstance(model, str) and isinstance(editor, str) and isinstance(meta.get("hparams_hash"), str):
        controller.hparams.setdefault(editor, {})[model] = meta["hparams_hash"]
    if isinstance(model, str) and isinstance(meta.get("corpus"), str) and isinstance(meta.get("corpus_sha256"), str):
        controller.corpora[model] = (meta["corpus"], meta["corpus_sha256"])
    if isinstance(meta.get("hardware"), str):
        controller.hardware.add(meta["hardware"])


# --------------------------------------------------------------------------------------------------
# The report


def _library_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("pytest-editsafety", "pytest", "pytest-xdist", "torch", "transformers", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _corpus_summary(plan: Any, controller: RunRecords) -> tuple[str, str]:
    seen = sorted(set(controller.corpora.values()))
    if len(seen) == 1:
        return seen[0]
    if seen:
        # several models measured on their own corpora (organisms vs real models): name them all
        return " + ".join(n for n, _ in seen), hashlib.sha256("|".join(s for _, s in seen).encode()).hexdigest()
    return " + ".join(sorted({m.ppl_corpus for m in plan.models})), "unknown"


def build_result(plan: Any, bounds: Any, controller: RunRecords, commands: tuple[str, ...]) -> Any:
    """The certificate (``results.RunResult``) of what ``controller`` gathered for ``plan``: shared by the plugin
    and the Python API (:func:`pytest_editsafety.api.certify`)."""
    from pytest_editsafety.plan import controller_identity
    from pytest_editsafety.results import CaseRecord, RunMetadata, RunResult, SequentialRecord

    corpus, corpus_sha = _corpus_summary(plan, controller)
    finished = datetime.now(timezone.utc)
    metadata = RunMetadata(
        editors=plan.editors,
        models={m.slug: controller.identities.get(m.slug) or controller_identity(m) for m in plan.models},
        hparams_hashes={e: dict(h) for e, h in controller.hparams.items() if e in plan.editors},
        bounds=bounds.to_dict(),
        corpus=corpus,
        corpus_sha256=corpus_sha,
        library_versions=_library_versions(),
        hardware="; ".join(sorted(controller.hardware)) or f"{platform.machine()} ({os.cpu_count()} cores)",
        started=controller.started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds"),
        duration_s=max(0.0, time.monotonic() - controller.t0),
        commands=commands,
    )
    cases, sequential = [], []
    for test_id in sorted(controller.records):
        data = controller.records[test_id]
        kind = plan.item(test_id).kind
        cls = SequentialRecord if kind == "sequential" else CaseRecord
        cases_or_seq = sequential if kind == "sequential" else cases
        cases_or_seq.append(cls.from_dict(data, source=f"the record of {test_id}"))
    return RunResult(metadata, tuple(cases), tuple(sequential))


class ControllerHooks:
    """Hooks of the controller (or the single process without xdist): records in, report out."""

    def __init__(self, config: pytest.Config, plan: Any, settings: Any, controller: RunRecords) -> None:
        self.config = config
        self.plan = plan
        self.settings = settings
        self.controller = controller

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        _on_report(self.plan, self.controller, report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        controller = self.controller
        if not controller.seen:  # no certification test ran (e.g. the project's own test-suite)
            return
        from pytest_editsafety.report import write_outputs

        settings = self.settings
        try:
            commands = (shlex.join(["pytest", *map(str, self.config.invocation_params.args)]),)
            result = build_result(self.plan, settings.bounds, controller, commands)
            controller.outputs = write_outputs(result, settings.report_json, settings.report_md,
                                               baseline=controller.baseline)
        except Exception as err:  # a missing certificate must not pass CI
            log.exception("writing the editsafety report failed")
            controller.write_error = f"{type(err).__name__}: {err}"
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        if controller.outputs.exit_code == 1 and session.exitstatus == 0:
            # e.g. every test passed but the run regressed against the baseline
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        controller = self.controller
        if not controller.seen:
            return
        terminalreporter.section("editsafety")
        if controller.write_error is not None:
            terminalreporter.write_line(f"editsafety: the report could not be written: {controller.write_error}",
                                        red=True)
            return
        outputs = controller.outputs
        if outputs is None:
            return
        records = list(controller.records.values())
        ok = sum(r.get("certified") is True and r.get("outcome") == "passed" for r in records)
        collapses = sum(bool(r.get("collapse")) for r in records)
        verdict = "CERTIFIED" if outputs.exit_code == 0 else "NOT CERTIFIED"
        line = f"editsafety: {verdict}: {ok}/{len(records)} tests certified, {collapses} collapse(s)"
        if outputs.regressions:
            line += f", {len(outputs.regressions)} regression(s) against the baseline"
        terminalreporter.write_line(line, green=outputs.exit_code == 0, red=outputs.exit_code != 0, bold=True)
        terminalreporter.write_line(f"editsafety: report {outputs.md_path}, results {outputs.json_path}")
