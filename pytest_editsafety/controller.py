"""The controller's side of a run: certification records in (from the workers' test reports), the certificate
out (``editsafety.json`` and ``editsafety.md``) and the exit code.

Per-test records travel on the test report's ``user_properties`` as plain data (pytest-cov's pattern), so the
controller alone writes the report, whether the tests ran in this process or on xdist workers.

The certificate records the plan and what this session made of it: which planned tests it selected (known
once collection ends, here or on the first xdist worker), its ``-k``/``-m`` expressions, its pytest-split
shard and whether it was interrupted; a run that covers less than its plan is PARTIAL, never CERTIFIED. Once
the selection is known an in-progress report (PARTIAL, "the run has not finished") replaces any older one,
so a controller killed before the end leaves no certificate behind, only that; every write is atomic.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pytest

from pytest_editsafety.results.journal import IN_PROGRESS
from pytest_editsafety.results.merge import add_sources

log = logging.getLogger(__name__)

__all__ = ["IN_PROGRESS", "META_PROPERTY", "RECORD_PROPERTY", "ControllerHooks", "TERMINATED", "RunRecords", "absorb_meta",
           "build_result", "invocation_commands", "outcome_properties", "planned_ids", "properties"]

RECORD_PROPERTY = "editsafety_record"
META_PROPERTY = "editsafety_meta"
# pytest-split's options (dests); read defensively, as the plugin is optional and another could own the names
SPLIT_OPTIONS = ("splits", "group")
STOPPED_EARLY = "stopped early"
# why a run that received SIGTERM stopped (the plugin turns the signal into a KeyboardInterrupt carrying this)
TERMINATED = "SIGTERM (terminated)"


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
    # editor -> model -> the hyper-parameters' values (the workers' "hparams" meta), beside their hashes
    hparams_values: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # editor -> model -> hyper-parameter -> the file that set it (the workers' "hparams_sources" meta)
    hparams_sources: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict)
    # model -> layer -> where its second moment C came from (the workers' "second_moments" meta)
    second_moments: dict[str, dict[str, str]] = field(default_factory=dict)
    corpora: dict[str, tuple[str, str]] = field(default_factory=dict)
    hardware: set[str] = field(default_factory=set)
    # the run uses the BOS-stripped protocol (--editsafety-strip-bos), and what it did to each model that loaded
    strip_bos: bool = False
    bos_protocols: dict[str, str] = field(default_factory=dict)
    # worker -> the device its last record named, for the records the controller makes for its tests
    devices: dict[str, str] = field(default_factory=dict)
    seen: bool = False
    # the planned test ids this session selected, once collection has ended (None until then, or unknown)
    selected: frozenset[str] | None = None
    # why the session stopped before running everything it selected (Ctrl-C, pytest.exit, -x, a crash)
    interrupted: str | None = None
    in_progress_written: bool = False
    # the plan's models found unable to load before the run started: slug -> why (their tests error)
    unloadable: dict[str, str] = field(default_factory=dict)
    # the records appended as tests finish (results.journal.RecordJournal), started with the in-progress report
    journal: Any = None
    result: Any = None
    outputs: Any = None
    write_error: str | None = None


_ID_IN_NODEID = re.compile(r"\[([^\[\]]*)\](?:@[^\[\]]*)?$")


def planned_ids(plan: Any, nodeids: Iterable[str]) -> frozenset[str]:
    """The plan's test ids among node ids (``...::test_edit_is_safe[rome-tiny-gpt2-hard-0007]@group``)."""
    matches = (_ID_IN_NODEID.search(nodeid) for nodeid in nodeids)
    return frozenset(m.group(1) for m in matches if m is not None and plan.item(m.group(1)) is not None)


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


def _worker_of(report: pytest.TestReport) -> str:
    """The xdist worker a report came from (xdist's controller sets ``report.node``), else this process."""
    from pytest_editsafety.devices import MAIN_WORKER

    gateway = getattr(getattr(report, "node", None), "gateway", None)
    return str(gateway.id) if gateway is not None else MAIN_WORKER


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
        _journal(controller, item)
        worker, device = record.get("worker"), record.get("device")
        if isinstance(worker, str) and isinstance(device, str):
            controller.devices[worker] = device
    elif report.failed:  # setup or teardown errors, a call that failed before attaching, a dead worker
        from pytest_editsafety.plan import error_record

        if known is not None:
            known["outcome"] = "error"
            _journal(controller, item)
        else:
            # xdist reports a test whose worker died with when="???"
            why = ("the worker running this test crashed" if report.when == "???"
                   else f"{report.when}: {_short(report.longrepr)}")
            worker = _worker_of(report)
            controller.records[item.test_id] = error_record(plan, item, why, duration_s=float(report.duration or 0.0),
                                                            worker=worker, device=controller.devices.get(worker))
            _journal(controller, item)


def _journal(controller: RunRecords, item: Any) -> None:
    if controller.journal is not None:
        controller.journal.append(item.test_id, item.kind, controller.records[item.test_id])


def _text_values(sources: dict[Any, Any]) -> dict[str, str]:
    """A worker's ``{key: source}`` meta, its keys as strings and only its text sources kept."""
    return {str(key): value for key, value in sources.items() if isinstance(value, str)}


def absorb_meta(controller: RunRecords, meta: Any) -> None:
    if not isinstance(meta, dict):
        return
    model, editor = meta.get("model"), meta.get("editor")
    if isinstance(model, str) and isinstance(meta.get("identity"), str):
        controller.identities[model] = meta["identity"]
    if isinstance(model, str) and isinstance(editor, str) and isinstance(meta.get("hparams_hash"), str):
        controller.hparams.setdefault(editor, {})[model] = meta["hparams_hash"]
        if isinstance(meta.get("hparams"), dict):
            controller.hparams_values.setdefault(editor, {})[model] = meta["hparams"]
        if isinstance(meta.get("hparams_sources"), dict):
            add_sources(controller.hparams_sources.setdefault(editor, {}).setdefault(model, {}),
                        _text_values(meta["hparams_sources"]))
    if isinstance(model, str) and isinstance(meta.get("corpus"), str) and isinstance(meta.get("corpus_sha256"), str):
        controller.corpora[model] = (meta["corpus"], meta["corpus_sha256"])
    if isinstance(meta.get("hardware"), str):
        controller.hardware.add(meta["hardware"])
    if isinstance(model, str) and isinstance(meta.get("second_moments"), dict):
        # workers whose editors took C at one layer from different sources: each source once
        add_sources(controller.second_moments.setdefault(model, {}), _text_values(meta["second_moments"]))
    if isinstance(model, str) and isinstance(meta.get("bos_protocol"), str):
        controller.bos_protocols[model] = meta["bos_protocol"]


# --------------------------------------------------------------------------------------------------
# The report


def _library_versions(editors: Sequence[str]) -> dict[str, str]:
    """The versions of what a run depends on, with the distributions that registered its installed editors."""
    from importlib import metadata

    from editors.registry import EditorRegistryError, editor_distributions

    versions = {"python": platform.python_version()}
    for dist in ("pytest-editsafety", "pytest", "pytest-xdist", "torch", "transformers", "tokenizers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    try:
        versions.update(editor_distributions(editors))
    except EditorRegistryError as err:  # a name clash fails the run's tests already; the report still gets written
        log.warning("the editors' distributions could not be named: %s", err)
    return versions


def _corpus_summary(plan: Any, controller: RunRecords) -> tuple[str, str]:
    seen = sorted(set(controller.corpora.values()))
    if len(seen) == 1:
        return seen[0]
    if seen:
        # several models measured on their own corpora (organisms vs real models): name them all
        return " + ".join(n for n, _ in seen), hashlib.sha256("|".join(s for _, s in seen).encode()).hexdigest()
    return " + ".join(sorted({m.ppl_corpus for m in plan.models})), "unknown"


def _shard(config: pytest.Config) -> Any:
    """This session's pytest-split group, if it is one: ``--splits N --group G``."""
    from pytest_editsafety.results import Shard

    splits, group = (config.getoption(name, None) for name in SPLIT_OPTIONS)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (splits, group)) and 1 <= group <= splits:
        return Shard("pytest-split", group, splits)
    return None


def _session(config: pytest.Config, plan: Any, controller: RunRecords, interrupted: str | None) -> Any:
    from pytest_editsafety.results import Session

    selected = controller.selected
    deselected = None if selected is None else tuple(i.test_id for i in plan.items if i.test_id not in selected)
    return Session(
        keyword=str(config.getoption("keyword", "") or ""),
        markexpr=str(config.getoption("markexpr", "") or ""),
        shard=_shard(config),
        deselected=deselected,
        interrupted=interrupted,
    )


def _stopped(session: pytest.Session, exitstatus: int) -> str | None:
    """Why the session ended before its selection ran, when ``pytest_keyboard_interrupt`` did not say."""
    if exitstatus == pytest.ExitCode.INTERRUPTED:
        return "interrupted"
    if exitstatus == pytest.ExitCode.INTERNAL_ERROR:
        return "pytest stopped on an internal error"
    reason = session.shouldfail or session.shouldstop
    if reason:
        return STOPPED_EARLY + (f": {reason}" if isinstance(reason, str) else "")
    return None


def invocation_commands(config: pytest.Config) -> tuple[str, ...]:
    """The command line of this pytest session, as the certificate records it."""
    return (shlex.join(["pytest", *map(str, config.invocation_params.args)]),)


def build_result(plan: Any, bounds: Any, controller: RunRecords, commands: tuple[str, ...], session: Any) -> Any:
    """The certificate (``results.RunResult``) of what ``controller`` gathered for ``plan`` in one ``session``
    (``results.Session``): shared by the plugin and the Python API (:func:`pytest_editsafety.api.certify`)."""
    from pytest_editsafety.plan import controller_identity
    from pytest_editsafety.results import (
        BOS_NOT_LOADED,
        BatchRecord,
        CaseRecord,
        RunMetadata,
        RunResult,
        SequentialRecord,
    )

    corpus, corpus_sha = _corpus_summary(plan, controller)
    finished = datetime.now(timezone.utc)
    metadata = RunMetadata(
        editors=plan.editors,
        models={m.slug: controller.identities.get(m.slug) or controller_identity(m) for m in plan.models},
        hparams_hashes={e: dict(h) for e, h in controller.hparams.items() if e in plan.editors},
        hparams={e: dict(v) for e, v in controller.hparams_values.items() if e in plan.editors},
        hparams_sources={e: dict(v) for e, v in controller.hparams_sources.items() if e in plan.editors},
        second_moments={m: dict(v) for m, v in controller.second_moments.items()
                        if m in {choice.slug for choice in plan.models}},
        bounds=bounds.to_dict(),
        corpus=corpus,
        corpus_sha256=corpus_sha,
        library_versions=_library_versions(plan.editors),
        hardware="; ".join(sorted(controller.hardware)) or f"{platform.machine()} ({os.cpu_count()} cores)",
        started=controller.started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds"),
        duration_s=max(0.0, time.monotonic() - controller.t0),
        commands=commands,
        # a model none of whose tests loaded it cannot say whether it had a BOS to strip
        bos_protocol={m.slug: controller.bos_protocols.get(m.slug, BOS_NOT_LOADED) for m in plan.models}
        if controller.strip_bos else {},
    )
    by_kind: dict[str, list[Any]] = {"case": [], "sequential": [], "batch": []}
    record_types = {"case": CaseRecord, "sequential": SequentialRecord, "batch": BatchRecord}
    for test_id in sorted(controller.records):
        data = controller.records[test_id]
        kind = plan.item(test_id).kind
        by_kind[kind].append(record_types[kind].from_dict(data, source=f"the record of {test_id}"))
    return RunResult(metadata, tuple(by_kind["case"]), tuple(by_kind["sequential"]), plan.record, (session,),
                     batches=tuple(by_kind["batch"]))


def _terminate_as_interrupt(config: pytest.Config) -> None:
    """SIGTERM (a cancelled CI job, a scheduler's time limit) ends the run as Ctrl-C does, so it writes a report
    marked interrupted rather than dying with the in-progress one; only where nobody else handles SIGTERM."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(TERMINATED)

    signal.signal(signal.SIGTERM, interrupt)
    config.add_cleanup(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))


class ControllerHooks:
    """Hooks of the controller (or the single process without xdist): records in, report out."""

    def __init__(self, config: pytest.Config, plan: Any, settings: Any, controller: RunRecords, *,
                 owned: bool = False) -> None:
        self.config = config
        # the run was asked for (an editsafety option given): a selection with none of its tests is still
        # a run of its plan, reported PARTIAL, not a silent success
        self.owned = owned
        self.outputs_lock: Any = None
        self.plan = plan
        self.settings = settings
        self.controller = controller
        from pytest_editsafety.results.journal import RecordJournal, journal_path

        controller.journal = RecordJournal(journal_path(settings.report_json))

    def hold_outputs(self) -> None:
        """Lock the run's output paths until pytest unconfigures (once); ``pytest.UsageError`` naming the other
        run while one holds them. Taken when the session starts, not at configure: one process may configure
        several times without running (pytester's ``parseconfigure``)."""
        if self.outputs_lock is not None:
            return
        from pytest_editsafety.output_lock import OutputsInUseError, lock_outputs

        try:
            self.outputs_lock = lock_outputs((self.settings.report_json, self.settings.report_md),
                                             command=invocation_commands(self.config)[0])
        except OutputsInUseError as err:
            raise pytest.UsageError(str(err)) from None
        self.config.add_cleanup(self.outputs_lock.release)

    def pytest_sessionstart(self, session: pytest.Session) -> None:
        if self.config.getoption("collectonly", False):
            return
        self.hold_outputs()
        _terminate_as_interrupt(self.config)

    def note_selection(self, nodeids: Iterable[str]) -> None:
        """The tests this session will run, once collection has ended: the planned ones among them become
        the session's selection, and an in-progress report replaces any older certificate."""
        controller = self.controller
        controller.selected = planned_ids(self.plan, nodeids)
        if self.config.getoption("collectonly", False) or controller.in_progress_written:
            return
        if not (controller.selected or self.owned):
            return
        from pytest_editsafety.report import write_outputs

        try:
            self.hold_outputs()
            result = build_result(self.plan, self.settings.bounds, controller, invocation_commands(self.config),
                                  _session(self.config, self.plan, controller, IN_PROGRESS))
            write_outputs(result, self.settings.report_json, self.settings.report_md, job_summary=False)
        except Exception as err:  # the final report is what counts; it says so itself if it fails too
            log.warning("could not write the in-progress editsafety report: %s: %s", type(err).__name__, err)
            return
        controller.in_progress_written = True
        try:
            controller.journal.start(self.plan.record.plan_hash)
        except OSError as err:
            log.warning("could not start the record journal %s: %s", controller.journal.path, err)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # without xdist (a controller's session collects nothing: plugin.pytest_xdist_node_collection_finished)
        self.note_selection(item.nodeid for item in session.items if item.get_closest_marker("editsafety"))

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        _on_report(self.plan, self.controller, report)

    def pytest_keyboard_interrupt(self, excinfo: pytest.ExceptionInfo[BaseException]) -> None:
        if excinfo.errisinstance(pytest.exit.Exception):
            self.controller.interrupted = f"pytest.exit: {getattr(excinfo.value, 'msg', '') or 'no reason given'}"
        elif excinfo.value.args == (TERMINATED,):
            self.controller.interrupted = TERMINATED
        else:
            self.controller.interrupted = "KeyboardInterrupt (Ctrl-C)"

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        controller = self.controller
        # no certification test ran nor was about to (e.g. the project's own test-suite)
        if not (controller.seen or controller.in_progress_written):
            return
        from pytest_editsafety.report import write_outputs

        if controller.interrupted is None:
            controller.interrupted = _stopped(session, exitstatus)
            if (controller.interrupted or "").startswith(STOPPED_EARLY) and controller.selected is not None \
                    and controller.selected <= controller.records.keys():
                # -x or --maxfail on the last test: it stopped nothing, every selected test has its record
                controller.interrupted = None
        settings = self.settings
        try:
            self.hold_outputs()
            controller.result = build_result(self.plan, settings.bounds, controller, invocation_commands(self.config),
                                             _session(self.config, self.plan, controller, controller.interrupted))
            controller.outputs = write_outputs(controller.result, settings.report_json, settings.report_md,
                                               baseline=controller.baseline, allow_missing=settings.allow_missing)
        except Exception as err:  # a missing certificate must not pass CI
            log.exception("writing the editsafety report failed")
            controller.write_error = f"{type(err).__name__}: {err}"
            controller.journal.close()
            if controller.journal.path.exists():
                controller.write_error += f" (the records of finished tests are in {controller.journal.path})"
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        controller.journal.discard()
        if controller.outputs.exit_code == 1 and session.exitstatus == 0:
            # e.g. every test passed but the run is partial or regressed against the baseline
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        from pytest_editsafety.report import CERTIFIED, PARTIAL

        controller = self.controller
        if not (controller.seen or controller.in_progress_written):
            return
        terminalreporter.section("editsafety")
        if controller.write_error is not None:
            terminalreporter.write_line(f"editsafety: the report could not be written: {controller.write_error}",
                                        red=True)
            return
        outputs, coverage = controller.outputs, controller.result.coverage if controller.result else None
        if outputs is None or coverage is None:
            return
        records = list(controller.records.values())
        ok = sum(r.get("certified") is True and r.get("outcome") == "passed" for r in records)
        collapses = sum(bool(r.get("collapse")) for r in records)
        head = outputs.verdict if coverage.complete or outputs.verdict == PARTIAL else f"{outputs.verdict}, {PARTIAL}"
        line = f"editsafety: {head}: {ok}/{len(records)} tests certified, {collapses} collapse(s)"
        errors = [r for r in records if r.get("outcome") == "error"]
        if errors:
            # an error is no finding about the editor (a bad setting, a model that will not load): say so apart
            line += f", {len(errors)} error(s)"
        if outputs.regressions:
            line += f", {len(outputs.regressions)} regression(s) against the baseline"
        if not coverage.complete:
            line += f"; {coverage.recorded} of {coverage.planned} planned tests recorded"
        certified = outputs.verdict == CERTIFIED
        terminalreporter.write_line(line, green=certified, yellow=outputs.verdict == PARTIAL,
                                    red=outputs.verdict not in (CERTIFIED, PARTIAL), bold=True)
        if errors:
            first = errors[0]
            why = str(next(iter(first.get("violations") or ()), "no reason recorded")).removeprefix("error: ")
            terminalreporter.write_line(f"editsafety: {len(errors)} test(s) errored rather than judged the edit, "
                                        f"first {first.get('test_id')}: {why.splitlines()[0]}", red=True)
        for slug, why in sorted(controller.unloadable.items()):
            terminalreporter.write_line(f"editsafety: model {slug} could not be loaded, so its tests errored: "
                                        f"{why.splitlines()[0]}", red=True)
        for gap in coverage.gaps:
            terminalreporter.write_line(f"editsafety: {PARTIAL.lower()} ({gap.kind}): {gap.message}", yellow=True)
        terminalreporter.write_line(f"editsafety: report {outputs.md_path}, results {outputs.json_path}")
