"""pytest entry point (``pytest11``): options, collection, record transport and the report.

Only the pytest side lives here; the work lives in plain modules: ``harness`` (the plan and the model hub), ``results``/``report`` (the
certificate), ``xdist_glue`` (GPU pinning). Nothing heavy is imported at startup: torch and transformers
load inside the hub, on the first certification test, so ``pytest tests/`` pays nothing for the plugin.

Flow: ``pytest_configure`` reads the options (each with an ``editsafety_*`` ini twin), validates them
(``pytest.UsageError``, exit 4) and builds the plan on the controller and on every worker alike;
``pytest_generate_tests`` turns it into one test per (editor, model, case) plus sequential tests; the
test attaches its record to ``user_properties``; the controller collects the records from the reports,
writes ``editsafety.json`` and ``editsafety.md`` at the end and fails the run on a baseline regression.
Fuzz tests (marker ``fuzz``, one per (editor, model)) are deselected unless ``-m`` names the marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import platform
import re
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety.bounds import Bounds, BoundsError
from pytest_editsafety.fuzz import DEFAULT_EXAMPLES as DEFAULT_FUZZ_EXAMPLES
from pytest_editsafety.fuzz import DEFAULT_OUT as DEFAULT_FUZZ_OUT
from pytest_editsafety.fuzz import MAX_RUNS_PER_EXAMPLE as FUZZ_RUNS_PER_EXAMPLE
from pytest_editsafety.fuzz import FuzzTarget

# GPU pinning and the xdist defaults live in their own plugin module, loaded with this one.
pytest_plugins = ["pytest_editsafety.xdist_glue"]

log = logging.getLogger(__name__)

ITEM_FIXTURE = "editsafety_item"
FUZZ_FIXTURE = "editsafety_fuzz_target"
FUZZ_MARKER = "fuzz"
RECORD_PROPERTY = "editsafety_record"
META_PROPERTY = "editsafety_meta"
DEFAULT_MODEL = "tiny-gpt2"
DEFAULT_CASES = "hard,normal"
DEFAULT_REPORT = "reports/editsafety.md"
DEFAULT_JSON = "reports/editsafety.json"
_BOUNDS = Bounds()


@dataclass(frozen=True)
class _Option:
    flag: str
    name: str  # dest and ini name, both "editsafety_<name>"
    help: str
    kind: str = "str"  # str | list | float | int | bool | path
    default: Any = None
    metavar: str | None = None


_OPTIONS: tuple[_Option, ...] = (
    _Option("--editor", "editor", "editor(s) to certify: a name, a comma list or 'all' (every built-in and "
            "installed editor; default)", "list", "all"),
    _Option("--model", "model", f"model(s): a built-in name, a Hugging Face id or a local directory; repeat or "
            f"comma-separate for several (default {DEFAULT_MODEL})", "list", DEFAULT_MODEL),
    _Option("--cases", "cases", f"case set(s): built-in names or case files, comma-separated (default "
            f"{DEFAULT_CASES})", "list", DEFAULT_CASES),
    _Option("--ppl-corpus", "ppl_corpus", "perplexity corpus: a built-in name or an ME-PPL JSON file (default "
            "organism-ppl for the model organisms, me-ppl-50 otherwise)", metavar="NAME|PATH"),
    _Option("--stats-corpus", "stats_corpus", "corpus for the second-moment statistics of editors with "
            "mom2_adjustment (default organism-heldout for the model organisms, the perplexity corpus "
            "otherwise)", metavar="NAME|PATH"),
    _Option("--max-ppl-ratio", "max_ppl_ratio", f"largest edited/unedited perplexity ratio (default "
            f"{_BOUNDS.max_ppl_ratio}; collapsed edits in the papers are >= 15x)", "float"),
    _Option("--collapse-ppl", "collapse_ppl", f"absolute perplexity above which an edit counts as a collapse "
            f"(default {_BOUNDS.collapse_ppl:g}, the papers' line; 'inf' disables)", "float"),
    _Option("--min-denominator-fraction", "min_denominator_fraction", f"ROME |uᵀk| floor as a fraction of its "
            f"median over the model's normal cases (default {_BOUNDS.min_denominator_fraction}; 0 disables)",
            "float"),
    _Option("--min-denominator-abs", "min_denominator_abs", "absolute ROME |uᵀk| floor (default none)", "float"),
    _Option("--min-efficacy", "min_efficacy", f"share of rewrite prompts where the edit must take (default "
            f"{_BOUNDS.min_efficacy})", "float"),
    _Option("--min-generalization", "min_generalization", f"paraphrase success share (default "
            f"{_BOUNDS.min_generalization})", "float"),
    _Option("--min-locality", "min_locality", f"neighbourhood share that must keep its answer (default "
            f"{_BOUNDS.min_locality})", "float"),
    _Option("--metric-family", "metric_family", f"metric family the share bounds read: counterfact or easyedit "
            f"(default {_BOUNDS.metric_family})", metavar="FAMILY"),
    _Option("--sequential", "sequential", "also run sequential editing per (editor, model, case set): the cases "
            "applied in order without restoring", "bool", False),
    _Option("--editsafety-report", "report", f"markdown report path (default {DEFAULT_REPORT})", "path",
            DEFAULT_REPORT),
    _Option("--editsafety-json", "json", f"JSON results path (default {DEFAULT_JSON})", "path", DEFAULT_JSON),
    _Option("--editsafety-baseline", "baseline", "a previous editsafety JSON to compare against; a regression "
            "fails the run", "path"),
    _Option("--stats-dir", "stats_dir", "directory of ROME/MEMIT second-moment .npz files to use instead of "
            "computing statistics", "path"),
    _Option("--editsafety-limit", "limit", "at most N cases per case set (quick runs)", "int"),
    _Option("--dtype", "dtype", "model dtype: float32, bfloat16, float16 or auto (default: transformers')",
            metavar="DTYPE"),
    _Option("--device-map", "device_map", "transformers device_map for loading (default: the worker's GPU, "
            "else CPU)", metavar="MAP"),
    _Option("--fuzz-examples", "fuzz_examples", f"cases hypothesis generates per (editor, model) in the fuzz suite "
            f"(-m {FUZZ_MARKER}), before shrinking a failing one (default {DEFAULT_FUZZ_EXAMPLES})", "int",
            DEFAULT_FUZZ_EXAMPLES),
    _Option("--fuzz-max-runs", "fuzz_max_runs", f"certification runs one fuzz search may take, generating and "
            f"shrinking together; shrinking stops there, reporting the smallest failing case found so far "
            f"(default {FUZZ_RUNS_PER_EXAMPLE} x --fuzz-examples)", "int"),
    _Option("--fuzz-out", "fuzz_out", f"case file the fuzz suite writes the failing cases it finds to; {{editor}} "
            f"and {{model}} are replaced (default {DEFAULT_FUZZ_OUT})", "path", DEFAULT_FUZZ_OUT),
)
_BOUND_FIELDS = frozenset(f.name for f in dataclasses.fields(Bounds))


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


_SETTINGS = pytest.StashKey[Settings]()
_PLAN = pytest.StashKey[Any]()
_PREVIOUS_CACHE_ENV = pytest.StashKey[str | None]()


# --------------------------------------------------------------------------------------------------
# Options


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("editsafety", "model-editing certification (pytest-editsafety)")
    group.addoption(
        "--editsafety-cache",
        dest="editsafety_cache",
        default=None,
        help="cache root for organisms, statistics and corpora (default: $EDITSAFETY_CACHE or the user cache dir)",
    )
    parser.addini("editsafety_cache", "cache root, see --editsafety-cache", default=None)
    group.addoption(
        "--editsafety-hparams",
        dest="editsafety_hparams",
        action="append",
        default=None,
        metavar="EDITOR=FILE",
        help="a JSON file of hyper-parameters for EDITOR, over its built-in ones for each model (repeat for "
             "several editors), e.g. mend=mend-gpt2.json",
    )
    parser.addini("editsafety_hparams", "see --editsafety-hparams (one EDITOR=FILE per line)", type="linelist",
                  default=[])
    for option in _OPTIONS:
        dest = f"editsafety_{option.name}"
        if option.kind == "bool":
            group.addoption(option.flag, dest=dest, action="store_true", default=None, help=option.help)
            parser.addini(dest, f"see {option.flag}", type="bool", default=False)
        elif option.kind == "list":
            group.addoption(option.flag, dest=dest, action="append", default=None, metavar=option.metavar or "NAME",
                            help=option.help)
            parser.addini(dest, f"see {option.flag} (comma- or newline-separated)", default="")
        else:
            metavar = option.metavar or {"str": "NAME", "path": "PATH", "float": "X", "int": "N"}[option.kind]
            group.addoption(option.flag, dest=dest, default=None, metavar=metavar, help=option.help)
            parser.addini(dest, f"see {option.flag}", default="")


def _split(values: Sequence[str] | str) -> list[str]:
    texts = [values] if isinstance(values, str) else list(values)
    return [part.strip() for text in texts for part in re.split(r"[,\n]", text) if part.strip()]


def _raw(config: pytest.Config, option: _Option) -> tuple[Any, str]:
    """(value, where it came from): the command line, else the ini file, else None."""
    dest = f"editsafety_{option.name}"
    value = config.getoption(dest)
    if value is not None:
        return value, option.flag
    ini = config.getini(dest)
    if option.kind == "bool":
        return (True, f"ini {dest}") if ini else (None, "")
    if isinstance(ini, str) and ini.strip():
        return ini.strip(), f"ini {dest}"
    return None, ""


def _path(config: pytest.Config, text: str, origin: str) -> Path:
    path = Path(text).expanduser()
    if path.is_absolute():
        return path
    # command-line paths are the caller's, relative to where pytest ran; ini paths to the ini file
    base = config.invocation_params.dir if not origin.startswith("ini") else (
        config.inipath.parent if config.inipath else config.rootpath)
    return Path(base) / path


def read_settings(config: pytest.Config) -> Settings:
    """The options and their ini twins as typed settings; bad values raise ``pytest.UsageError``."""
    values: dict[str, Any] = {}
    bounds: dict[str, Any] = {}
    for option in _OPTIONS:
        raw, origin = _raw(config, option)
        if raw is None:
            raw, origin = option.default, "default"
        if raw is None:
            values[option.name] = None
            continue
        if option.name in _BOUND_FIELDS:
            bounds[option.name] = raw
        elif option.kind == "list":
            values[option.name] = tuple(_split(raw))
        elif option.kind == "int":
            try:
                values[option.name] = int(str(raw))
            except ValueError:
                raise pytest.UsageError(f"{origin}: expected an integer, got {raw!r}") from None
        elif option.kind == "path":
            values[option.name] = _path(config, str(raw), origin)
        elif option.kind == "bool":
            values[option.name] = bool(raw)
        else:
            values[option.name] = str(raw).strip() or None
    try:
        parsed = Bounds.from_mapping(bounds)
    except BoundsError as err:
        raise pytest.UsageError(f"editsafety bounds: {err}") from None
    if values["fuzz_examples"] is not None and values["fuzz_examples"] < 1:
        raise pytest.UsageError(f"--fuzz-examples: must be at least 1, got {values['fuzz_examples']}")
    if values["fuzz_max_runs"] is not None and values["fuzz_max_runs"] < 1:
        raise pytest.UsageError(f"--fuzz-max-runs: must be at least 1, got {values['fuzz_max_runs']}")
    if values["dtype"] is not None:
        from pytest_editsafety.registry import DTYPES

        if values["dtype"] not in DTYPES:
            raise pytest.UsageError(f"--dtype: unsupported value {values['dtype']!r}; use one of {', '.join(DTYPES)}")
    return Settings(
        editors=_editor_names(values["editor"] or ()),
        models=values["model"] or (),
        cases=values["cases"] or (),
        ppl_corpus=values["ppl_corpus"],
        stats_corpus=values["stats_corpus"],
        bounds=parsed,
        sequential=bool(values["sequential"]),
        report_md=values["report"],
        report_json=values["json"],
        baseline=values["baseline"],
        stats_dir=values["stats_dir"],
        limit=values["limit"],
        dtype=values["dtype"],
        device_map=values["device_map"],
        fuzz_examples=values["fuzz_examples"],
        fuzz_out=values["fuzz_out"],
        fuzz_max_runs=values["fuzz_max_runs"],
        editor_hparams=_editor_hparams(config),
    )


def _editor_names(requested: Sequence[str]) -> tuple[str, ...]:
    from editors.registry import EditorRegistryError, available_editors

    try:
        available = available_editors()
    except EditorRegistryError as err:
        raise pytest.UsageError(f"--editor: {err}") from None
    names: list[str] = []
    for name in requested:
        for chosen in (available if name.lower() == "all" else (name,)):
            if chosen not in available:
                raise pytest.UsageError(f"--editor: unknown editor {chosen!r}; available: {', '.join(available)}")
            if chosen not in names:
                names.append(chosen)
    return tuple(names)


def _editor_hparams(config: pytest.Config) -> tuple[tuple[str, Path], ...]:
    """``--editsafety-hparams EDITOR=FILE`` values (else the ini's lines) as (editor, file) pairs, each file
    read once here so that a typo is a usage error now, not an error in every test of the editor."""
    from editors.hparams import HparamsError, read_hparams_file
    from editors.registry import EditorRegistryError, available_editors

    given = config.getoption("editsafety_hparams")
    origin = "--editsafety-hparams"
    if not given:
        given, origin = config.getini("editsafety_hparams"), "ini editsafety_hparams"
    if not given:
        return ()
    try:
        known = available_editors()
    except EditorRegistryError as err:
        raise pytest.UsageError(f"{origin}: {err}") from None
    pairs: dict[str, Path] = {}
    for value in given:
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


def _validate_corpus(name: str) -> None:
    from pytest_editsafety.corpora import CorpusError, known_corpus_names, load_me_ppl

    path = Path(name).expanduser()
    if path.exists():
        try:
            load_me_ppl(path)
        except CorpusError as err:
            raise pytest.UsageError(f"--ppl-corpus: {err}") from None
        return
    if name.strip().lower() not in known_corpus_names():
        raise pytest.UsageError(
            f"--ppl-corpus: {name!r} is neither an existing ME-PPL JSON file nor a known corpus "
            f"({', '.join(known_corpus_names())})"
        )


def _build_plan(settings: Settings) -> Any:
    from pytest_editsafety.cases import CaseValidationError
    from pytest_editsafety.plan import PlanError, build_plan

    try:
        plan = build_plan(settings.editors, settings.models, settings.cases, ppl_corpus=settings.ppl_corpus,
                          limit=settings.limit, sequential=settings.sequential)
    except PlanError as err:
        raise pytest.UsageError(str(err)) from None
    except CaseValidationError as err:
        raise pytest.UsageError(f"--cases: {err}") from None
    except ValueError as err:  # unknown or unsupported models name themselves
        raise pytest.UsageError(f"--model: {err}") from None
    for corpus in sorted({m.ppl_corpus for m in plan.models} | ({settings.stats_corpus} - {None})):
        _validate_corpus(corpus)
    return plan


def pytest_configure(config: pytest.Config) -> None:
    from pytest_editsafety.cache import CACHE_ENV

    root = config.getoption("editsafety_cache") or config.getini("editsafety_cache")
    if root:
        # restored at unconfigure, so an in-process pytest run (pytester) leaves its caller's env alone
        config.stash[_PREVIOUS_CACHE_ENV] = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = str(root)
    config.addinivalue_line("markers", "editsafety: a pytest-editsafety certification test")
    config.addinivalue_line("markers", f"{FUZZ_MARKER}: hypothesis searches for cases that break the bounds "
                                       f"(deselected unless -m names it)")
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run with these tests on one xdist worker")

    settings = read_settings(config)
    if settings.stats_dir is not None and not settings.stats_dir.is_dir():
        raise pytest.UsageError(f"--stats-dir: {settings.stats_dir} is not a directory")
    config.stash[_SETTINGS] = settings
    config.stash[_PLAN] = _build_plan(settings)
    if not hasattr(config, "workerinput"):
        controller = _Controller(started=datetime.now(timezone.utc), t0=time.monotonic())
        if settings.baseline is not None:
            from pytest_editsafety.results import ResultsError, read_result

            try:
                controller.baseline = read_result(settings.baseline)
            except ResultsError as err:
                raise pytest.UsageError(f"--editsafety-baseline: {err}") from None
        config.pluginmanager.register(ControllerHooks(config, controller), "editsafety-controller")


def pytest_unconfigure(config: pytest.Config) -> None:
    from pytest_editsafety.cache import CACHE_ENV

    if _PREVIOUS_CACHE_ENV in config.stash:
        previous = config.stash[_PREVIOUS_CACHE_ENV]
        if previous is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = previous


def get_settings(config: pytest.Config) -> Settings:
    """The validated settings of a configured run."""
    return config.stash[_SETTINGS]


def get_plan(config: pytest.Config) -> Any:
    """The plan (``pytest_editsafety.plan.Plan``) of a configured run."""
    return config.stash[_PLAN]


# --------------------------------------------------------------------------------------------------
# Collection and the tests' fixtures


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if FUZZ_FIXTURE in metafunc.fixturenames:
        _parametrize_fuzz(metafunc)
    if ITEM_FIXTURE not in metafunc.fixturenames:
        return
    plan = metafunc.config.stash[_PLAN]
    params = [
        pytest.param(item, id=item.test_id, marks=[pytest.mark.editsafety, pytest.mark.xdist_group(xdist_group(item))])
        for item in plan.items
    ]
    metafunc.parametrize(ITEM_FIXTURE, params)


def _parametrize_fuzz(metafunc: pytest.Metafunc) -> None:
    """One fuzz test per (editor, model) of the plan, grouped like certification tests."""
    plan = metafunc.config.stash[_PLAN]
    targets = [FuzzTarget(editor, model.slug, model.given) for model in plan.models for editor in plan.editors]
    metafunc.parametrize(FUZZ_FIXTURE, [
        pytest.param(t, id=t.test_id, marks=[pytest.mark.xdist_group(xdist_group(t))]) for t in targets])


_NAMES_FUZZ = re.compile(rf"\b{FUZZ_MARKER}\b")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Fuzz tests search for minutes: they run only when ``-m`` names the marker (``-m fuzz``); a bare
    ``pytest`` deselects them, whatever else it selects."""
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
    return pytestconfig.stash[_PLAN]


@pytest.fixture(scope="session")
def editsafety_hub(pytestconfig: pytest.Config) -> Iterator[Any]:
    """This worker's ``ModelHub``: loads each model once and runs certification tests against it."""
    from pytest_editsafety.hub import HubOptions, ModelHub

    settings = pytestconfig.stash[_SETTINGS]
    options = HubOptions(
        bounds=settings.bounds,
        dtype=settings.dtype,
        device_map=settings.device_map,
        stats_dir=str(settings.stats_dir) if settings.stats_dir else None,
        stats_corpus=settings.stats_corpus,
        editor_hparams={editor: str(path) for editor, path in settings.editor_hparams} or None,
    )
    yield ModelHub(pytestconfig.stash[_PLAN], options)


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
