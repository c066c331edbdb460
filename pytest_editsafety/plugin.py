"""pytest entry point (``pytest11``): options, collection, record transport and the report.

Only the pytest side lives here; the work lives in plain modules: ``plan`` and ``hub`` (what runs and how a test runs it),
``results``/``report`` (the certificate), ``xdist_glue`` (GPU pinning and scheduling). Nothing heavy is
imported at startup: torch and transformers load inside the hub, on the first certification test.

Installed in an environment, the plugin acts only on runs that ask for it; in any other it registers its
options and markers and nothing else. It activates:

* at configure time when an editsafety option is set, on the command line or as its ``editsafety_*`` ini
  twin. Such a run is *owned*: the options are validated and the plan is built at once (a bad value is a
  ``pytest.UsageError``, exit 4), and under xdist the controller and its workers take the roles of
  ``xdist_glue`` (``-n auto`` = number of GPUs, one GPU per worker; xdist's ``load`` scheduling spreads
  every (editor, model) over all workers, in the plan's model-major order);
* otherwise when collection first meets a test that requests ``editsafety_item`` or
  ``editsafety_fuzz_target`` (the modules of ``pytest_editsafety.suites``, which this repository's ``suites/``
  re-exports), or when an xdist controller first receives such a test's record: the plan is built from the
  defaults then, and xdist keeps its own scheduling.

A run whose command line names an editor, a model or case sets but no paths, and whose collection holds no
editsafety test, collects the shipped suites too (``pytest_editsafety.shipped``), so ``pytest --editor=rome
--model=gpt2`` certifies from any directory.

Flow: ``pytest_generate_tests`` turns the plan into one test per (editor, model, case) plus sequential
tests; the test attaches its record to ``user_properties``; the controller (``ControllerHooks``) learns
which planned tests the session selected once collection ends, collects the records from the reports,
writes ``editsafety.json`` and ``editsafety.md`` at the end and fails the run when it is partial or
regresses against the baseline. Fuzz tests (marker ``editsafety_fuzz``, one per (editor, model)) are
deselected unless ``-m`` names the marker.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import pytest

from pytest_editsafety import xdist_glue
from pytest_editsafety.controller import (
    META_PROPERTY,
    RECORD_PROPERTY,
    ControllerHooks,
    RunRecords,
    outcome_properties,
    properties,
)
from pytest_editsafety.fuzz import FuzzTarget
from pytest_editsafety.options import (
    FUZZ_MARKER,
    Settings,
    add_options,
    given_options,
    options_given,
    origin,
    plan_for,
    read_settings,
    selection_on_command_line,
)

log = logging.getLogger(__name__)

__all__ = ["get_plan", "get_settings", "outcome_properties"]

ITEM_FIXTURE = "editsafety_item"
FUZZ_FIXTURE = "editsafety_fuzz_target"
CONTROLLER_PLUGIN = "editsafety-controller"


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


_SETTINGS = pytest.StashKey[Settings]()
_PLAN = pytest.StashKey[Any]()
# a usage error met while collecting, raised once collection ends (see _plan_for_collection)
_COLLECTION_ERROR = pytest.StashKey[pytest.UsageError]()
# failed reports an unowned xdist controller received before the first certification record
_EARLY_REPORTS = pytest.StashKey[list[pytest.TestReport]]()
# the node ids the first xdist worker collected (what the session selected), for a controller not yet active
_XDIST_COLLECTED = pytest.StashKey[Sequence[str]]()


# --------------------------------------------------------------------------------------------------
# Activation


def _activate(config: pytest.Config) -> Any:
    """Read and check the options, build the plan and, outside xdist workers, start gathering records
    (``ControllerHooks``); returns the plan. Raises ``pytest.UsageError``."""
    from pytest_editsafety.editors_package import EditorsPackageError, check_editors_package

    try:
        check_editors_package()
    except EditorsPackageError as err:
        raise pytest.UsageError(str(err)) from None
    given = given_options(config)
    settings = read_settings(config, given)
    plan = plan_for(settings, given)
    controller = None
    if not hasattr(config, "workerinput"):
        controller = RunRecords(started=datetime.now(timezone.utc), t0=time.monotonic(), strip_bos=settings.strip_bos)
        if settings.baseline is not None:
            from pytest_editsafety.results import ResultsError, read_result

            try:
                controller.baseline = read_result(settings.baseline)
            except ResultsError as err:
                raise pytest.UsageError(f"{origin(given, 'baseline')}: {err}") from None
        if not config.getoption("collectonly", False):
            controller.unloadable = _check_models(plan, given)
            _check_layers(plan, settings, given)
    config.stash[_SETTINGS] = settings
    config.stash[_PLAN] = plan
    if controller is not None:
        config.pluginmanager.register(ControllerHooks(config, plan, settings, controller, owned=options_given(config)),
                                      CONTROLLER_PLUGIN)
    return plan


def _check_models(plan: Any, given: Any) -> dict[str, str]:
    """The plan's models that cannot load, found before any test runs: a usage error when that is every model
    of the run (nothing could be certified), else ``{slug: why}`` for the summary (their tests error)."""
    from pytest_editsafety.model_check import unloadable_models

    problems = dict(unloadable_models(plan.models))
    if problems and len(problems) == len(plan.models):
        raise pytest.UsageError(f"{origin(given, 'model')}: no model of this run can be loaded:\n"
                                + "\n".join(problems.values()))
    for slug, why in problems.items():
        log.warning("model %s cannot be loaded; its tests will error: %s", slug, why)
    return problems


def _check_layers(plan: Any, settings: Any, given: Any) -> None:
    """A layer setting that a model's config, readable without loading it, shows out of range is a usage error
    before any test runs (a real model would otherwise load, then fail every test on it)."""
    from pytest_editsafety.model_check import layer_problems

    problems = layer_problems(plan.models, plan.editors, dict(settings.editor_hparams),
                              str(settings.cache_root) if settings.cache_root else None)
    if problems:
        raise pytest.UsageError(f"{origin(given, 'editor')}: a layer the model does not have:\n" + "\n".join(problems))


def _active_plan(config: pytest.Config) -> Any:
    return config.stash[_PLAN] if _PLAN in config.stash else _activate(config)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # first, so that a worker is pinned to its GPU before any other plugin can initialise CUDA
    config.addinivalue_line("markers", "editsafety: a pytest-editsafety certification test")
    config.addinivalue_line("markers", f"{FUZZ_MARKER}: hypothesis searches for cases that break the editsafety "
                                       f"bounds (deselected unless -m names it)")
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run with these tests on one xdist worker")
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and xdist_glue.DEVICE_KEY in workerinput:
        # the controller handed this worker a device, so it owns the run
        config.pluginmanager.register(xdist_glue.WorkerXdist(), "editsafety-xdist-worker")
    if not options_given(config):
        return
    _activate(config)
    if selection_on_command_line(config):
        # a project that carries no certification test still gets the suite it asked for (pytest_editsafety.shipped)
        from pytest_editsafety.shipped import ShippedSuites

        config.pluginmanager.register(ShippedSuites((ITEM_FIXTURE, FUZZ_FIXTURE, "editsafety_hub", "editsafety_plan")),
                                      "editsafety-shipped-suites")
    if workerinput is None and config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(xdist_glue.ControllerXdist(), "editsafety-xdist-controller")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` in an owned run: one worker per GPU (None: xdist's CPU count, as in any other run).

    Called before ``pytest_configure``, hence a hook of its own."""
    return xdist_glue.auto_num_workers(config) if options_given(config) else None


def get_settings(config: pytest.Config) -> Settings:
    """The validated settings of the run (activating the plugin if nothing has yet)."""
    _active_plan(config)
    return config.stash[_SETTINGS]


def get_plan(config: pytest.Config) -> Any:
    """The plan (``pytest_editsafety.plan.Plan``) of the run (activating the plugin if nothing has yet)."""
    return _active_plan(config)


# --------------------------------------------------------------------------------------------------
# Collection and the tests' fixtures


def _plan_for_collection(config: pytest.Config) -> Any | None:
    """The plan, built now if this is the first certification test collected; None after a usage error.

    pytest turns an error raised while collecting a module into a collection error (exit 2), so a usage
    error here is kept and raised from ``pytest_collection_modifyitems`` (exit 4) once collection ends.
    Not on an xdist worker: its controller takes a usage error raised after collection for a crash
    (INTERNALERROR, message lost), while a collection error reaches the user. Only the defaults get here
    (a run given an option was checked at configure time), so this is the environment failing them, e.g.
    two installed editors by one name.
    """
    if _COLLECTION_ERROR in config.stash:
        return None
    try:
        return _active_plan(config)
    except pytest.UsageError as err:
        if hasattr(config, "workerinput"):
            raise
        config.stash[_COLLECTION_ERROR] = err
        return None


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if FUZZ_FIXTURE not in metafunc.fixturenames and ITEM_FIXTURE not in metafunc.fixturenames:
        return
    plan = _plan_for_collection(metafunc.config)
    if plan is None:
        return
    if FUZZ_FIXTURE in metafunc.fixturenames:
        # one fuzz test per (editor, model) of the plan, grouped like certification tests
        targets = [FuzzTarget(editor, model.slug, model.given) for model in plan.models for editor in plan.editors]
        metafunc.parametrize(FUZZ_FIXTURE, [
            pytest.param(t, id=t.test_id, marks=[pytest.mark.xdist_group(xdist_group(t))]) for t in targets])
    if ITEM_FIXTURE in metafunc.fixturenames:
        metafunc.parametrize(ITEM_FIXTURE, [
            pytest.param(item, id=item.test_id,
                         marks=[pytest.mark.editsafety, pytest.mark.xdist_group(xdist_group(item))])
            for item in plan.items
        ])


_NAMES_FUZZ = re.compile(rf"\b{FUZZ_MARKER}\b")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fuzz tests search for minutes: they run only when ``-m`` names their marker (``-m editsafety_fuzz``);
    a bare ``pytest`` deselects them, whatever else it selects."""
    if _COLLECTION_ERROR in config.stash:
        raise config.stash[_COLLECTION_ERROR]
    if _NAMES_FUZZ.search(config.getoption("markexpr", "") or ""):
        return
    fuzz = [item for item in items if item.get_closest_marker(FUZZ_MARKER) is not None]
    if fuzz:
        config.hook.pytest_deselected(items=fuzz)
        items[:] = [item for item in items if item.get_closest_marker(FUZZ_MARKER) is None]


def xdist_group(item: Any) -> str:
    """The ``--dist loadgroup`` group of a test, for a user who chooses that mode: its (model, editor) pair.

    Under loadgroup a worker runs a group's tests back to back and each (model, editor) stays on one GPU;
    xdist's default ``load``, which owned runs keep, spreads every group over all workers instead.
    """
    return f"{item.model}.{item.editor}"


@pytest.fixture(scope="session")
def editsafety_plan(pytestconfig: pytest.Config) -> Any:
    """The run's plan (editors, models, case sets, items): ``pytest_editsafety.plan.Plan``."""
    return get_plan(pytestconfig)


def _terminal_progress(config: pytest.Config) -> Any:
    """Where a model's slow set-up (C, the denominator floor: minutes for a real model on a CPU) reports its
    progress while pytest captures the test that set it off: the terminal, capture suspended for the line. An xdist
    worker writes to the stderr it shares with the controller's terminal, its id first."""
    import sys

    capture = config.pluginmanager.get_plugin("capturemanager")
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    worker = getattr(config, "workerinput", {}).get("workerid")

    def show(line: str) -> None:
        suspended = capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext()
        with suspended:
            if worker is None and reporter is not None:
                reporter.write_line(f"editsafety: {line}")
            else:
                sys.stderr.write(f"editsafety [{worker or 'main'}]: {line}\n")
                sys.stderr.flush()

    return show


@pytest.fixture(scope="session")
def editsafety_hub(pytestconfig: pytest.Config, request: pytest.FixtureRequest) -> Iterator[Any]:
    """This worker's ``ModelHub``: loads each model once and runs certification tests against it."""
    from pytest_editsafety.devices import MAIN_WORKER
    from pytest_editsafety.hub import HubOptions, ModelHub

    settings = get_settings(pytestconfig)
    options = HubOptions(
        bounds=settings.bounds,
        dtype=settings.dtype,
        device_map=settings.device_map,
        stats_dir=str(settings.stats_dir) if settings.stats_dir else None,
        stats_corpus=settings.stats_corpus,
        editor_hparams={editor: tuple(map(str, files)) for editor, files in settings.editor_hparams} or None,
        cache_root=str(settings.cache_root) if settings.cache_root else None,
        restore_check=settings.restore_check,
        strip_bos=settings.strip_bos,
        sequential_every=settings.sequential_every,
        search_batch=settings.search_batch,
        share_measurements=not settings.measure_alone,
        ppl_skip_unedited_blocks=not settings.ppl_full_pass,
        downstream=settings.downstream,
        downstream_limit=settings.downstream_limit,
        # "gw0"... on an xdist worker: each record says which worker measured it
        worker=str(pytestconfig.workerinput["workerid"]) if hasattr(pytestconfig, "workerinput") else MAIN_WORKER,
        progress=_terminal_progress(pytestconfig),
    )
    yield ModelHub(get_plan(pytestconfig), options, run_order=run_order(request.session.items))


def run_order(items: Sequence[pytest.Item]) -> list[str]:
    """The certification tests among ``items`` (a session's selection, in its order), as plan test ids: a hub's
    search batch takes the cases after the one under way from them, so a ``-k`` selection measures nothing else."""
    return [params[ITEM_FIXTURE].test_id for params in (_parameters(item) for item in items) if ITEM_FIXTURE in params]


def _parameters(item: pytest.Item) -> Mapping[str, Any]:
    """A collected test's parameters (``callspec.params``; a test that is not parametrized has none)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params if callspec is not None else {}


# --------------------------------------------------------------------------------------------------
# Records on the controller


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node: Any, ids: Sequence[str]) -> None:
    """What an xdist session selected: the ids its workers collected (every worker collects the same, after
    -k, -m and a pytest-split shard), kept until a controller is active to take them."""
    config = node.config
    if _XDIST_COLLECTED in config.stash:
        return
    config.stash[_XDIST_COLLECTED] = ids
    controller = config.pluginmanager.get_plugin(CONTROLLER_PLUGIN)
    if controller is not None:
        controller.note_selection(ids)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """An xdist controller collects nothing: in a run it does not own, it activates on the first certification
    record a worker sends, and then takes in the failed certification reports that came before it."""
    config = getattr(getattr(report, "node", None), "config", None)  # xdist's controller sets report.node
    if config is None or _PLAN in config.stash:
        return
    if not (properties(report, RECORD_PROPERTY) or properties(report, META_PROPERTY)):
        # a crashed worker's test (xdist keeps no keywords then) or one that failed before attaching a record
        if report.failed and (report.when == "???" or "editsafety" in getattr(report, "keywords", {})):
            config.stash.setdefault(_EARLY_REPORTS, []).append(report)
        return
    _activate(config)
    controller = config.pluginmanager.get_plugin(CONTROLLER_PLUGIN)
    if _XDIST_COLLECTED in config.stash:
        controller.note_selection(config.stash[_XDIST_COLLECTED])
    # registered during this very hook call, which pluggy does not extend to it
    for earlier in [*config.stash.get(_EARLY_REPORTS, []), report]:
        controller.pytest_runtest_logreport(earlier)
