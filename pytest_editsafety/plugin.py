"""pytest entry point (``pytest11``): options, collection, record transport and the report.

Only the pytest side lives here; the work lives in plain modules: ``plan`` and ``hub`` (what runs and how a test runs it),
``results``/``report`` (the certificate), ``xdist_glue`` (GPU pinning and scheduling). Nothing heavy is
imported at startup: torch and transformers load inside the hub, on the first certification test.

Installed in an environment, the plugin acts only on runs that ask for it; in any other it registers its
options and markers and nothing else. It activates:

* at configure time when an editsafety option is set, on the command line or as its ``editsafety_*`` ini
  twin. Such a run is *owned*: the options are validated and the plan is built at once (a bad value is a
  ``pytest.UsageError``, exit 4), and under xdist the controller and its workers take the roles of
  ``xdist_glue`` (``--dist loadgroup`` by default, ``-n auto`` = number of GPUs, one GPU per worker);
* otherwise when collection first meets a test that requests ``editsafety_item`` or
  ``editsafety_fuzz_target`` (the modules in ``suites/``), or when an xdist controller first receives such
  a test's record: the plan is built from the defaults then, and xdist keeps its own scheduling.

Flow: ``pytest_generate_tests`` turns the plan into one test per (editor, model, case) plus sequential
tests; the test attaches its record to ``user_properties``; the controller (``ControllerHooks``) collects
the records from the reports, writes ``editsafety.json`` and ``editsafety.md`` at the end and fails the
run on a baseline regression. Fuzz tests (marker ``editsafety_fuzz``, one per (editor, model)) are
deselected unless ``-m`` names the marker.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import platform
import re
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety import xdist_glue
from pytest_editsafety.bounds import Bounds, BoundsError
from pytest_editsafety.fuzz import DEFAULT_EXAMPLES as DEFAULT_FUZZ_EXAMPLES
from pytest_editsafety.fuzz import DEFAULT_OUT as DEFAULT_FUZZ_OUT
from pytest_editsafety.fuzz import MAX_RUNS_PER_EXAMPLE as FUZZ_RUNS_PER_EXAMPLE
from pytest_editsafety.fuzz import FuzzTarget

log = logging.getLogger(__name__)

ITEM_FIXTURE = "editsafety_item"
FUZZ_FIXTURE = "editsafety_fuzz_target"
FUZZ_MARKER = "editsafety_fuzz"
RECORD_PROPERTY = "editsafety_record"
META_PROPERTY = "editsafety_meta"
DEFAULT_MODEL = "tiny-gpt2"
DEFAULT_CASES = "hard,normal"
DEFAULT_REPORT = "reports/editsafety.md"
DEFAULT_JSON = "reports/editsafety.json"
CONTROLLER_PLUGIN = "editsafety-controller"
_BOUNDS = Bounds()


# --------------------------------------------------------------------------------------------------
# Options


def _bound(name: str) -> Callable[[Any], Any]:
    """The parser of one ``Bounds`` field, with ``Bounds``' own checks (no bound depends on another)."""

    def parse(raw: Any) -> Any:
        try:
            return getattr(Bounds.from_mapping({name: raw}), name)
        except BoundsError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def _positive_int(raw: Any) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _dtype(raw: str) -> str:
    from pytest_editsafety.registry import DTYPES

    if raw.strip() not in DTYPES:
        raise argparse.ArgumentTypeError(f"unsupported value {raw!r}; use one of {', '.join(DTYPES)}")
    return raw.strip()


@dataclass(frozen=True)
class _Option:
    """A command-line option and its ini twin ``editsafety_<name>`` (also the option's dest)."""

    group: str
    flag: str
    name: str
    help: str
    ini: str = "string"  # the twin's addini type; "linelist" also makes the flag repeatable, "bool" a switch
    parse: Callable[[Any], Any] | None = None  # argparse's type=, applied to the ini value too
    metavar: str | None = None

    @property
    def key(self) -> str:
        return f"editsafety_{self.name}"


SELECTION = "editsafety: selection"
BOUNDS = "editsafety: bounds"
OUTPUTS = "editsafety: outputs"
LOADING = "editsafety: loading"
FUZZ = "editsafety: fuzz"

_OPTIONS: tuple[_Option, ...] = (
    _Option(SELECTION, "--editor", "editor", "editor(s) to certify: a name, a comma list or 'all' (every "
            "built-in and installed editor; default)", "linelist", metavar="NAME"),
    _Option(SELECTION, "--model", "model", f"model(s): a built-in name, a Hugging Face id or a local directory; "
            f"repeat or comma-separate for several (default {DEFAULT_MODEL})", "linelist", metavar="NAME"),
    _Option(SELECTION, "--cases", "cases", f"case set(s): built-in names or case files, comma-separated (default "
            f"{DEFAULT_CASES})", "linelist", metavar="NAME|PATH"),
    _Option(SELECTION, "--editsafety-limit", "limit", "at most N cases per case set (quick runs)", "int",
            _positive_int, "N"),
    _Option(SELECTION, "--editsafety-sequential", "sequential", "also run sequential editing per (editor, model, "
            "case set): the cases applied in order without restoring", "bool"),
    _Option(BOUNDS, "--editsafety-max-ppl-ratio", "max_ppl_ratio", f"largest edited/unedited perplexity ratio "
            f"(default {_BOUNDS.max_ppl_ratio}; collapsed edits in the papers are >= 15x)", "float",
            _bound("max_ppl_ratio"), "X"),
    _Option(BOUNDS, "--editsafety-collapse-ppl", "collapse_ppl", f"absolute perplexity above which an edit counts "
            f"as a collapse (default {_BOUNDS.collapse_ppl:g}, the papers' line; 'inf' disables)", "float",
            _bound("collapse_ppl"), "X"),
    _Option(BOUNDS, "--editsafety-min-denominator-fraction", "min_denominator_fraction", f"ROME |uᵀk| floor as a "
            f"fraction of its median over the model's normal cases (default {_BOUNDS.min_denominator_fraction}; "
            f"0 disables)", "float", _bound("min_denominator_fraction"), "X"),
    _Option(BOUNDS, "--editsafety-min-denominator-abs", "min_denominator_abs", "absolute ROME |uᵀk| floor "
            "(default none)", "float", _bound("min_denominator_abs"), "X"),
    _Option(BOUNDS, "--editsafety-min-efficacy", "min_efficacy", f"share of rewrite prompts where the edit must "
            f"take (default {_BOUNDS.min_efficacy})", "float", _bound("min_efficacy"), "X"),
    _Option(BOUNDS, "--editsafety-min-generalization", "min_generalization", f"paraphrase success share (default "
            f"{_BOUNDS.min_generalization})", "float", _bound("min_generalization"), "X"),
    _Option(BOUNDS, "--editsafety-min-locality", "min_locality", f"neighbourhood share that must keep its answer "
            f"(default {_BOUNDS.min_locality})", "float", _bound("min_locality"), "X"),
    _Option(BOUNDS, "--editsafety-metric-family", "metric_family", f"metric family the share bounds read: "
            f"counterfact or easyedit (default {_BOUNDS.metric_family})", "string", _bound("metric_family"),
            "FAMILY"),
    _Option(OUTPUTS, "--editsafety-report", "report", f"markdown report path (default {DEFAULT_REPORT})",
            metavar="PATH"),
    _Option(OUTPUTS, "--editsafety-json", "json", f"JSON results path (default {DEFAULT_JSON})", metavar="PATH"),
    _Option(OUTPUTS, "--editsafety-baseline", "baseline", "a previous editsafety JSON to compare against; a "
            "regression fails the run", metavar="PATH"),
    _Option(LOADING, "--editsafety-dtype", "dtype", "model dtype: float32, bfloat16, float16 or auto (default: "
            "transformers')", parse=_dtype, metavar="DTYPE"),
    _Option(LOADING, "--editsafety-device-map", "device_map", "transformers device_map for loading (default: the "
            "worker's GPU, else CPU)", metavar="MAP"),
    _Option(LOADING, "--editsafety-hparams", "hparams", "a JSON file of hyper-parameters for EDITOR, over its "
            "built-in ones for each model (repeat for several editors), e.g. mend=mend-gpt2.json", "linelist",
            metavar="EDITOR=FILE"),
    _Option(LOADING, "--editsafety-ppl-corpus", "ppl_corpus", "perplexity corpus: a built-in name or an ME-PPL "
            "JSON file (default organism-ppl for the model organisms, me-ppl-50 otherwise)", metavar="NAME|PATH"),
    _Option(LOADING, "--editsafety-stats-corpus", "stats_corpus", "corpus for the second-moment statistics of "
            "editors with mom2_adjustment (default organism-heldout for the model organisms, the perplexity "
            "corpus otherwise)", metavar="NAME|PATH"),
    _Option(LOADING, "--editsafety-stats-dir", "stats_dir", "directory of ROME/MEMIT second-moment .npz files to "
            "use instead of computing statistics", metavar="PATH"),
    _Option(LOADING, "--editsafety-cache", "cache", "cache root for organisms, statistics, corpora and trained "
            "editors (default: $EDITSAFETY_CACHE or the user cache dir)", metavar="PATH"),
    _Option(FUZZ, "--editsafety-fuzz-examples", "fuzz_examples", f"cases hypothesis generates per (editor, model) "
            f"in the fuzz suite (-m {FUZZ_MARKER}), before shrinking a failing one (default "
            f"{DEFAULT_FUZZ_EXAMPLES})", "int", _positive_int, "N"),
    _Option(FUZZ, "--editsafety-fuzz-max-runs", "fuzz_max_runs", f"certification runs one fuzz search may take, "
            f"generating and shrinking together; shrinking stops there, reporting the smallest failing case "
            f"found so far (default {FUZZ_RUNS_PER_EXAMPLE} x --editsafety-fuzz-examples)", "int", _positive_int,
            "N"),
    _Option(FUZZ, "--editsafety-fuzz-out", "fuzz_out", f"case file the fuzz suite writes the failing cases it "
            f"finds to; {{editor}} and {{model}} are replaced (default {DEFAULT_FUZZ_OUT})", metavar="PATH"),
)
_BY_NAME = {option.name: option for option in _OPTIONS}


@dataclass(frozen=True)
class Settings:
    editors: tuple[str, ...]
    models: tuple[str, ...]
    cases: tuple[str, ...]
    ppl_corpus: str | None
    stats_corpus: str | None
    bounds: Bounds
    sequential: bool
    report_md: Path
    report_json: Path
    baseline: Path | None
    stats_dir: Path | None
    limit: int | None
    dtype: str | None
    device_map: str | None
    fuzz_examples: int = DEFAULT_FUZZ_EXAMPLES
    fuzz_out: Path = Path(DEFAULT_FUZZ_OUT)
    fuzz_max_runs: int | None = None  # None: fuzz.default_max_runs(fuzz_examples)
    # (editor, user hparams file) pairs from --editsafety-hparams, layered over the built-in files
    editor_hparams: tuple[tuple[str, Path], ...] = ()
    # --editsafety-cache; None: pytest_editsafety.cache's default ($EDITSAFETY_CACHE, else the user cache dir)
    cache_root: Path | None = None


@dataclass
class _Controller:
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


_Given = dict[str, tuple[Any, str] | None]  # option name -> (value, where it was set), None when unset

_SETTINGS = pytest.StashKey[Settings]()
_PLAN = pytest.StashKey[Any]()
# a usage error met while collecting, raised once collection ends (see _plan_for_collection)
_COLLECTION_ERROR = pytest.StashKey[pytest.UsageError]()
# failed reports an unowned xdist controller received before the first certification record
_EARLY_REPORTS = pytest.StashKey[list[pytest.TestReport]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    for option in _OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.key, "default": None, "help": option.help}
        if option.ini == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs.update(metavar=option.metavar, type=option.parse)
            if option.ini == "linelist":
                kwargs["action"] = "append"
        parser.getgroup(option.group).addoption(option.flag, **kwargs)
        twin = f"see {option.flag} (one value a line)" if option.ini == "linelist" else f"see {option.flag}"
        parser.addini(option.key, twin, type=option.ini, default=None)


def _given(config: pytest.Config, option: _Option) -> tuple[Any, str] | None:
    """(value, where it was set) from the command line, else the ini file; None when unset (an empty ini
    value is unset). Bad ini values raise ``pytest.UsageError`` naming the ini key."""
    value = config.getoption(option.key)
    if value is not None:
        return value, option.flag
    origin = f"ini {option.key}"
    try:
        value = config.getini(option.key)
    except pytest.UsageError as err:  # pytest's own int/float/bool conversion does not name the key
        raise pytest.UsageError(f"{origin}: {err}") from None
    if value is None or value == [] or (isinstance(value, str) and not value.strip()):
        return None
    if option.parse is not None:
        try:
            value = option.parse(value)
        except argparse.ArgumentTypeError as err:
            raise pytest.UsageError(f"{origin}: {err}") from None
    return value, origin


def options_given(config: pytest.Config) -> bool:
    """Whether the run asks for editsafety (the plugin owns it): any of its options set, on the command line
    or in the ini file. Raises ``pytest.UsageError`` for a bad ini value."""
    return any(_given(config, option) is not None for option in _OPTIONS)


def _origin(given: _Given, name: str) -> str:
    """Where an option's value came from, for messages: its flag when it was not set."""
    got = given[name]
    return got[1] if got is not None else _BY_NAME[name].flag


def _split(values: Sequence[str] | str) -> list[str]:
    texts = [values] if isinstance(values, str) else list(values)
    return [part.strip() for text in texts for part in re.split(r"[,\n]", text) if part.strip()]


def _path(config: pytest.Config, text: str, origin: str) -> Path:
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    # command-line paths are the caller's, relative to where pytest ran; ini paths to the ini file
    base = config.invocation_params.dir if not origin.startswith("ini") else (
        config.inipath.parent if config.inipath else config.rootpath)
    return Path(base) / path


def _settings(config: pytest.Config, given: _Given) -> Settings:
    """The options as typed settings, defaults filled in; the values that need more than a parser (editors,
    hparams files, corpora, the statistics directory) are checked here, raising ``pytest.UsageError``."""

    def value(name: str, default: Any = None) -> Any:
        got = given[name]
        return default if got is None else got[0]

    def path(name: str, default: str | None = None) -> Path | None:
        got = given[name]
        if got is None:
            return None if default is None else _path(config, default, "default")
        return _path(config, str(got[0]), got[1])

    bounds = Bounds(**{f.name: given[f.name][0] for f in dataclasses.fields(Bounds) if given[f.name] is not None})
    stats_dir = path("stats_dir")
    if stats_dir is not None and not stats_dir.is_dir():
        raise pytest.UsageError(f"{_origin(given, 'stats_dir')}: {stats_dir} is not a directory")
    for name in ("ppl_corpus", "stats_corpus"):
        if given[name] is not None:
            _validate_corpus(str(given[name][0]), _origin(given, name))
    return Settings(
        editors=_editor_names(_split(value("editor", "all")), _origin(given, "editor")),
        models=tuple(_split(value("model", DEFAULT_MODEL))),
        cases=tuple(_split(value("cases", DEFAULT_CASES))),
        ppl_corpus=value("ppl_corpus"),
        stats_corpus=value("stats_corpus"),
        bounds=bounds,
        sequential=bool(value("sequential", False)),
        report_md=path("report", DEFAULT_REPORT),
        report_json=path("json", DEFAULT_JSON),
        baseline=path("baseline"),
        stats_dir=stats_dir,
        limit=value("limit"),
        dtype=value("dtype"),
        device_map=value("device_map"),
        fuzz_examples=value("fuzz_examples", DEFAULT_FUZZ_EXAMPLES),
        fuzz_out=path("fuzz_out", DEFAULT_FUZZ_OUT),
        fuzz_max_runs=value("fuzz_max_runs"),
        editor_hparams=_editor_hparams(config, given["hparams"]),
        cache_root=path("cache"),
    )


def _editor_names(requested: Sequence[str], origin: str) -> tuple[str, ...]:
    from editors.registry import EditorRegistryError, available_editors

    try:
        available = available_editors()
    except EditorRegistryError as err:
        raise pytest.UsageError(f"{origin}: {err}") from None
    names: list[str] = []
    for name in requested:
        for chosen in (available if name.lower() == "all" else (name,)):
            if chosen not in available:
                raise pytest.UsageError(f"{origin}: unknown editor {chosen!r}; available: {', '.join(available)}")
            if chosen not in names:
                names.append(chosen)
    return tuple(names)


def _editor_hparams(config: pytest.Config, given: tuple[Any, str] | None) -> tuple[tuple[str, Path], ...]:
    """``--editsafety-hparams EDITOR=FILE`` values (else the ini's lines) as (editor, file) pairs, each file
    read once here so that a typo is a usage error now, not an error in every test of the editor."""
    if given is None:
        return ()
    from editors.hparams import HparamsError, read_hparams_file
    from editors.registry import EditorRegistryError, available_editors

    values, origin = given
    try:
        known = available_editors()
    except EditorRegistryError as err:
        raise pytest.UsageError(f"{origin}: {err}") from None
    pairs: dict[str, Path] = {}
    for value in values:
        editor, sep, file = (part.strip() for part in value.partition("="))
        if not sep or not editor or not file:
            raise pytest.UsageError(f"{origin}: expected EDITOR=FILE, got {value!r}")
        if editor not in known:
            raise pytest.UsageError(f"{origin}: unknown editor {editor!r} in {value!r}; available: {', '.join(known)}")
        if editor in pairs:
            raise pytest.UsageError(f"{origin}: editor {editor!r} given twice ({value!r})")
        path = _path(config, file, origin)
        if not path.is_file():
            raise pytest.UsageError(f"{origin}: {value!r}: no such file {path}")
        try:
            read_hparams_file(path)
        except HparamsError as err:
            raise pytest.UsageError(f"{origin}: {value!r}: {err}") from None
        pairs[editor] = path
    return tuple(pairs.items())


def _validate_corpus(name: str, origin: str) -> None:
    from pytest_editsafety.corpora import CorpusError, known_corpus_names, load_me_ppl

    path = Path(name).expanduser()
    if path.exists():
        try:
            load_me_ppl(path)
        except CorpusError as err:
            raise pytest.UsageError(f"{origin}: {err}") from None
        return
    if name.strip().lower() not in known_corpus_names():
        raise pytest.UsageError(
            f"{origin}: {name!r} is neither an existing ME-PPL JSON file nor a known corpus "
            f"({', '.join(known_corpus_names())})"
        )


def _build_plan(settings: Settings, given: _Given) -> Any:
    from pytest_editsafety.cases import CaseValidationError
    from pytest_editsafety.plan import PlanError, build_plan

    try:
        return build_plan(settings.editors, settings.models, settings.cases, ppl_corpus=settings.ppl_corpus,
                          limit=settings.limit, sequential=settings.sequential)
    except PlanError as err:
        raise pytest.UsageError(str(err)) from None
    except CaseValidationError as err:
        raise pytest.UsageError(f"{_origin(given, 'cases')}: {err}") from None
    except ValueError as err:  # unknown or unsupported models name themselves
        raise pytest.UsageError(f"{_origin(given, 'model')}: {err}") from None


# --------------------------------------------------------------------------------------------------
# Activation


def _activate(config: pytest.Config) -> Any:
    """Read and check the options, build the plan and, outside xdist workers, start gathering records
    (``ControllerHooks``); returns the plan. Raises ``pytest.UsageError``."""
    given = {option.name: _given(config, option) for option in _OPTIONS}
    settings = _settings(config, given)
    plan = _build_plan(settings, given)
    controller = None
    if not hasattr(config, "workerinput"):
        controller = _Controller(started=datetime.now(timezone.utc), t0=time.monotonic())
        if settings.baseline is not None:
            from pytest_editsafety.results import ResultsError, read_result

            try:
                controller.baseline = read_result(settings.baseline)
            except ResultsError as err:
                raise pytest.UsageError(f"{_origin(given, 'baseline')}: {err}") from None
    config.stash[_SETTINGS] = settings
    config.stash[_PLAN] = plan
    if controller is not None:
        config.pluginmanager.register(ControllerHooks(config, controller), CONTROLLER_PLUGIN)
    return plan


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
    """The ``--dist loadgroup`` group of a test: its (model, editor) pair.

    A worker runs a group's tests back to back and the plan is model-major, so each worker loads a model
    once, while different editors of one model still spread over workers (one GPU each). Grouping by
    model alone would run a one-model certification on a single GPU however many there are.
    """
    return f"{item.model}.{item.editor}"


@pytest.fixture(scope="session")
def editsafety_plan(pytestconfig: pytest.Config) -> Any:
    """The run's plan (editors, models, case sets, items): ``pytest_editsafety.plan.Plan``."""
    return get_plan(pytestconfig)


@pytest.fixture(scope="session")
def editsafety_hub(pytestconfig: pytest.Config) -> Iterator[Any]:
    """This worker's ``ModelHub``: loads each model once and runs certification tests against it."""
    from pytest_editsafety.hub import HubOptions, ModelHub

    settings = get_settings(pytestconfig)
    options = HubOptions(
        bounds=settings.bounds,
        dtype=settings.dtype,
        device_map=settings.device_map,
        stats_dir=str(settings.stats_dir) if settings.stats_dir else None,
        stats_corpus=settings.stats_corpus,
        editor_hparams={editor: str(path) for editor, path in settings.editor_hparams} or None,
        cache_root=str(settings.cache_root) if settings.cache_root else None,
    )
    yield ModelHub(get_plan(pytestconfig), options)


def outcome_properties(outcome: Any) -> list[tuple[str, Any]]:
    """The ``user_properties`` entries that carry a test's record and metadata to the controller."""
    return [(RECORD_PROPERTY, outcome.record), (META_PROPERTY, outcome.meta)]


# --------------------------------------------------------------------------------------------------
# Records on the controller

_ID_IN_NODEID = re.compile(r"\[([^\[\]]*)\](?:@[^\[\]]*)?$")


def _properties(report: pytest.TestReport, name: str) -> list[Any]:
    return [value for key, value in getattr(report, "user_properties", ()) if key == name]


def _short(longrepr: Any) -> str:
    text = str(longrepr or "").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    # pytest puts the exception line ("E   ...") last; a crash report is a single line
    errors = [line for line in lines if line.startswith("E ")]
    return (errors[-1][1:].strip() if errors else lines[-1])[:300]


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """An xdist controller collects nothing: in a run it does not own, it activates on the first certification
    record a worker sends, and then takes in the failed certification reports that came before it."""
    config = getattr(getattr(report, "node", None), "config", None)  # xdist's controller sets report.node
    if config is None or _PLAN in config.stash:
        return
    if not (_properties(report, RECORD_PROPERTY) or _properties(report, META_PROPERTY)):
        # a crashed worker's test (xdist keeps no keywords then) or one that failed before attaching a record
        if report.failed and (report.when == "???" or "editsafety" in getattr(report, "keywords", {})):
            config.stash.setdefault(_EARLY_REPORTS, []).append(report)
        return
    _activate(config)
    controller = config.pluginmanager.get_plugin(CONTROLLER_PLUGIN)
    # registered during this very hook call, which pluggy does not extend to it
    for earlier in [*config.stash.get(_EARLY_REPORTS, []), report]:
        controller.pytest_runtest_logreport(earlier)


def _on_report(config: pytest.Config, controller: _Controller, report: pytest.TestReport) -> None:
    plan = config.stash[_PLAN]
    for meta in _properties(report, META_PROPERTY):
        _absorb_meta(controller, meta)
    records = _properties(report, RECORD_PROPERTY)
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


def _absorb_meta(controller: _Controller, meta: Any) -> None:
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


def _corpus_summary(plan: Any, controller: _Controller) -> tuple[str, str]:
    seen = sorted(set(controller.corpora.values()))
    if len(seen) == 1:
        return seen[0]
    if seen:
        # several models measured on their own corpora (organisms vs real models): name them all
        return " + ".join(n for n, _ in seen), hashlib.sha256("|".join(s for _, s in seen).encode()).hexdigest()
    return " + ".join(sorted({m.ppl_corpus for m in plan.models})), "unknown"


def build_result(config: pytest.Config, controller: _Controller) -> Any:
    from pytest_editsafety.plan import controller_identity
    from pytest_editsafety.results import CaseRecord, RunMetadata, RunResult, SequentialRecord

    plan = config.stash[_PLAN]
    settings = config.stash[_SETTINGS]
    corpus, corpus_sha = _corpus_summary(plan, controller)
    finished = datetime.now(timezone.utc)
    metadata = RunMetadata(
        editors=plan.editors,
        models={m.slug: controller.identities.get(m.slug) or controller_identity(m) for m in plan.models},
        hparams_hashes={e: dict(h) for e, h in controller.hparams.items() if e in plan.editors},
        bounds=settings.bounds.to_dict(),
        corpus=corpus,
        corpus_sha256=corpus_sha,
        library_versions=_library_versions(),
        hardware="; ".join(sorted(controller.hardware)) or f"{platform.machine()} ({os.cpu_count()} cores)",
        started=controller.started.isoformat(timespec="seconds"),
        finished=finished.isoformat(timespec="seconds"),
        duration_s=max(0.0, time.monotonic() - controller.t0),
        commands=(shlex.join(["pytest", *map(str, config.invocation_params.args)]),),
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

    def __init__(self, config: pytest.Config, controller: _Controller) -> None:
        self.config = config
        self.controller = controller

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        _on_report(self.config, self.controller, report)

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        controller = self.controller
        if not controller.seen:  # no certification test ran (e.g. the project's own test-suite)
            return
        from pytest_editsafety.report import write_outputs

        settings = self.config.stash[_SETTINGS]
        try:
            result = build_result(self.config, controller)
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
