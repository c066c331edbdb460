"""The plugin's options: declarations, their ini twins, parsing and the typed ``Settings`` a run reads.

``--editor``, ``--model`` and ``--cases`` keep the design card's names; every other option is
``--editsafety-*``. Each has an ini twin ``editsafety_<name>`` of its real type, and each value, given on the
command line or in the ini file, goes through the same parser (argparse's ``type=``), so a bad value is a
usage error (exit 4) naming the flag or the ini key. Values that need more than a parser (editors, hparams
files, corpora, the statistics directory) are checked when the settings are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pytest_editsafety.bounds import Bounds, BoundsError
from pytest_editsafety.fuzz import DEFAULT_EXAMPLES as DEFAULT_FUZZ_EXAMPLES
from pytest_editsafety.fuzz import DEFAULT_OUT as DEFAULT_FUZZ_OUT
from pytest_editsafety.fuzz import MAX_RUNS_PER_EXAMPLE as FUZZ_RUNS_PER_EXAMPLE

__all__ = ["Given", "OPTIONS", "Settings", "add_options", "given_options", "options_given", "origin",
           "plan_for", "read_settings"]

FUZZ_MARKER = "editsafety_fuzz"
DEFAULT_MODEL = "tiny-gpt2"
DEFAULT_CASES = "hard,normal"
DEFAULT_REPORT = "reports/editsafety.md"
DEFAULT_JSON = "reports/editsafety.json"
_BOUNDS = Bounds()


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


def _restore_check(raw: Any) -> str:
    from pytest_editsafety.hub_options import RESTORE_CHECKS

    if str(raw).strip() not in RESTORE_CHECKS:
        raise argparse.ArgumentTypeError(f"unsupported value {raw!r}; use one of {', '.join(RESTORE_CHECKS)}")
    return str(raw).strip()


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

OPTIONS: tuple[_Option, ...] = (
    _Option(SELECTION, "--editor", "editor", "editor(s) to certify: a name, a comma list or 'all' (every "
            "built-in and installed editor; default)", "linelist", metavar="NAME"),
    _Option(SELECTION, "--model", "model", f"model(s): a built-in name, a Hugging Face id or a local directory; "
            f"repeat or comma-separate for several (default {DEFAULT_MODEL})", "linelist", metavar="NAME"),
    _Option(SELECTION, "--cases", "cases", f"case set(s): built-in names or case files, comma-separated (default "
            f"{DEFAULT_CASES})", "linelist", metavar="NAME|PATH"),
    _Option(SELECTION, "--editsafety-limit", "limit", "at most N cases per case set: a quick run, reported "
            "PARTIAL (never CERTIFIED) when a set has more", "int", _positive_int, "N"),
    _Option(SELECTION, "--editsafety-batch-size", "batch_size", "certify batches: each case set's cases, K at a "
            "time in file order, applied in one edit, one test per batch (memit-tiny-gpt2-normal-k8-batch-003); each "
            "member is measured after the whole batch and judged on its own bounds and the batch's perplexity. "
            "Only for editors that declare they take K requests at once (memit, emmet, alphaedit); any other "
            "editor's batch tests error, naming it (default 1: one test per case)", "int", _positive_int, "K"),
    _Option(SELECTION, "--editsafety-sequential", "sequential", "also run sequential editing per (editor, model, "
            "case set): the cases applied in order without restoring", "bool"),
    _Option(SELECTION, "--editsafety-sequential-edits", "sequential_edits", "edits per sequential run, the case "
            "set's first N in file order (default the papers' 107, or the whole set where it holds fewer); more than "
            "a set holds is an error", "int", _positive_int, "N"),
    _Option(SELECTION, "--editsafety-sequential-every", "sequential_every", "measure a sequential run's perplexity "
            "and edited-weight norms after every K-th edit, and always after the last (default 1 on the model "
            "organisms, 10 otherwise)", "int", _positive_int, "K"),
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
    _Option(BOUNDS, "--editsafety-max-downstream-drop", "max_downstream_drop", "largest drop of any downstream "
            "task's score after an edit, unedited minus edited (--editsafety-downstream; default none: recorded, "
            "not bounded)", "float", _bound("max_downstream_drop"), "X"),
    _Option(BOUNDS, "--editsafety-min-efficacy", "min_efficacy", f"share of rewrite prompts where the edit must "
            f"take (default {_BOUNDS.min_efficacy})", "float", _bound("min_efficacy"), "X"),
    _Option(BOUNDS, "--editsafety-min-generalization", "min_generalization", f"paraphrase success share (default "
            f"{_BOUNDS.min_generalization})", "float", _bound("min_generalization"), "X"),
    _Option(BOUNDS, "--editsafety-min-locality", "min_locality", f"neighbourhood share that must keep its answer "
            f"(default {_BOUNDS.min_locality})", "float", _bound("min_locality"), "X"),
    _Option(BOUNDS, "--editsafety-metric-family", "metric_family", f"metric family the share bounds read: "
            f"counterfact, easyedit (both teacher-forced) or generation (greedy decoding) (default "
            f"{_BOUNDS.metric_family})", "string", _bound("metric_family"),
            "FAMILY"),
    _Option(OUTPUTS, "--editsafety-report", "report", f"markdown report path (default {DEFAULT_REPORT})",
            metavar="PATH"),
    _Option(OUTPUTS, "--editsafety-json", "json", f"JSON results path (default {DEFAULT_JSON}; beside "
            "--editsafety-report, with its name and .json, when only that is given)", metavar="PATH"),
    _Option(OUTPUTS, "--editsafety-baseline", "baseline", "a previous editsafety JSON to compare against; a "
            "regression, or a test of the baseline this run lacks, fails the run", metavar="PATH"),
    _Option(OUTPUTS, "--editsafety-allow-missing", "allow_missing", "tests of --editsafety-baseline that this run "
            "lacks are listed in the report, not regressions", "bool"),
    _Option(LOADING, "--editsafety-dtype", "dtype", "model dtype: float32, bfloat16, float16 or auto (default: "
            "transformers')", parse=_dtype, metavar="DTYPE"),
    _Option(LOADING, "--editsafety-device-map", "device_map", "transformers device_map for loading (default: the "
            "worker's GPU, else CPU)", metavar="MAP"),
    _Option(LOADING, "--editsafety-hparams", "hparams", "a JSON file of hyper-parameters for EDITOR, over its "
            "built-in ones for each model (repeat for several editors), e.g. mend=mend-gpt2.json", "linelist",
            metavar="EDITOR=FILE"),
    _Option(LOADING, "--editsafety-ppl-corpus", "ppl_corpus", "perplexity corpus: a built-in name or an ME-PPL "
            "JSON file (default organism-ppl for the model organisms, me-ppl-50 otherwise)", metavar="NAME|PATH"),
    _Option(LOADING, "--editsafety-sequential-ppl-corpus", "sequential_ppl_corpus", "perplexity corpus of "
            "sequential runs: a built-in name or an ME-PPL JSON file (default the papers' me-ppl-1k; a model organism's "
            "own perplexity corpus, --editsafety-ppl-corpus's or organism-ppl)", metavar="NAME|PATH"),
    _Option(LOADING, "--editsafety-stats-corpus", "stats_corpus", "corpus for the second-moment statistics of "
            "editors with mom2_adjustment: a built-in name, an ME-PPL JSON file, a .txt file (one text per line) or a "
            "directory written by datasets' save_to_disk (default organism-wiki for the model organisms, "
            "wikitext-103 from the Hugging Face datasets cache otherwise)", metavar="NAME|PATH"),
    _Option(LOADING, "--editsafety-stats-dir", "stats_dir", "directory of ROME/MEMIT second-moment .npz files to "
            "use instead of computing statistics", metavar="PATH"),
    _Option(LOADING, "--editsafety-restore-check", "restore_check", "after every test, check that the editor "
            "changed nothing outside its declared parameters (else the test fails and the model is reloaded): "
            "full (default; a checksum of every tensor, on its device), sampled (a fixed sample of each tensor: "
            "catches dense writes and replaced tensors, not a few entries) or off", parse=_restore_check,
            metavar="full|sampled|off"),
    _Option(SELECTION, "--editsafety-downstream", "downstream", "lm-evaluation-harness tasks scored on the "
            "unedited model and after every single edit, comma-separated: lm-eval's names (piqa, lambada_openai, "
            "...) or the organisms' organism_mc and organism_cloze; needs the downstream extra (pip install "
            "'pytest-editsafety[downstream]')", "linelist", metavar="TASKS"),
    _Option(SELECTION, "--editsafety-downstream-limit", "downstream_limit", "at most N examples of each "
            "downstream task (default all)", "int", _positive_int, "N"),
    _Option(LOADING, "--editsafety-search-batch", "search_batch", "single-edit cases of one (editor, model, case "
            "set) whose edit searches (ROME's v*, MEMIT's z) run together on the unedited model, each case then "
            "applied, measured and restored alone; same numbers to float rounding. Default: 8 on a GPU, where "
            "a batch costs little more than one case, 1 on a CPU, where it saves about a seventh; 1 measures each "
            "case alone", "int", _positive_int, "N"),
    _Option(LOADING, "--editsafety-measure-alone", "measure_alone", "each editor runs its own edit searches, even "
            "where an earlier editor of the run measured the same one for the case (ROME and its C-ROME variants "
            "share v*, MEMIT, EMMET and AlphaEdit share z, with equal settings): the same records (bit for bit at "
            "a search batch of 1), at the cost of every search", "bool"),
    _Option(LOADING, "--editsafety-ppl-full-pass", "ppl_full_pass", "every perplexity measurement runs the whole "
            "model, even the blocks below an edit's lowest edited layer, whose output over the corpus the edit "
            "cannot change (by default, under the full restore check, it is recorded once per model and replayed: "
            "the same numbers bit for bit, at most 1 GiB kept per model)",
            "bool"),
    _Option(LOADING, "--editsafety-strip-bos", "strip_bos", "the papers' BOS-stripped protocol (A.2): a model whose "
            "tokenizer prepends BOS (Llama's <s>) runs without it, for edits, metrics, context templates and "
            "statistics, so a subject that opens a prompt is the first token; recorded in the report; a no-op, "
            "noted there, for a tokenizer that prepends none (GPT-2, GPT-J)", "bool"),
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
_BY_NAME = {option.name: option for option in OPTIONS}


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
    # editor -> its files and named sets, layered in order over the built-in file (--editsafety-hparams)
    editor_hparams: tuple[tuple[str, tuple[Path, ...]], ...] = ()
    # --editsafety-cache; None: pytest_editsafety.cache's default ($EDITSAFETY_CACHE, else the user cache dir)
    cache_root: Path | None = None
    # --editsafety-allow-missing: baseline tests this run lacks are listed, not regressions
    allow_missing: bool = False
    # --editsafety-restore-check: full, sampled or off (pytest_editsafety.hub_options.RESTORE_CHECKS)
    restore_check: str = "full"
    # --editsafety-strip-bos: the BOS-stripped protocol (pytest_editsafety.bos)
    strip_bos: bool = False
    # --editsafety-batch-size: cases per batch test; 1 = one test per case
    batch_size: int = 1
    # --editsafety-downstream (lm-eval task names) and --editsafety-downstream-limit: pytest_editsafety.downstream
    downstream: tuple[str, ...] = ()
    downstream_limit: int | None = None
    # --editsafety-search-batch; None: the default for the device (pytest_editsafety.preparation.default_search_batch)
    search_batch: int | None = None
    # --editsafety-measure-alone: no measurement shared between editors (pytest_editsafety.shared_measurements)
    measure_alone: bool = False
    # --editsafety-ppl-full-pass: no replay of the unedited blocks below an edit (pytest_editsafety.lower_blocks)
    ppl_full_pass: bool = False
    # --editsafety-sequential-edits, -every and -ppl-corpus: the sequential protocol (pytest_editsafety.sequential);
    # None: its defaults (107 edits or the whole set, every edit on organisms and every 10th otherwise, ME-PPL_1k)
    sequential_edits: int | None = None
    sequential_every: int | None = None
    sequential_ppl_corpus: str | None = None


Given = dict[str, tuple[Any, str] | None]  # option name -> (value, where it was set), None when unset


def add_options(parser: pytest.Parser) -> None:
    """Register every option in its help group, with its typed ini twin."""
    for option in OPTIONS:
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
    return any(_given(config, option) is not None for option in OPTIONS)


# the options that say what to certify; one of them on the command line asks for a certification run
SELECTION_OPTIONS = ("editor", "model", "cases")


def selection_on_command_line(config: pytest.Config) -> bool:
    """Whether the command line names an editor, a model or case sets (not an ini twin, nor another option)."""
    return any(config.getoption(option.key) is not None for option in OPTIONS if option.name in SELECTION_OPTIONS)


def origin(given: Given, name: str) -> str:
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


def read_settings(config: pytest.Config, given: Given) -> Settings:
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
        raise pytest.UsageError(f"{origin(given, 'stats_dir')}: {stats_dir} is not a directory")
    corpora: dict[str, str | None] = {}
    for name in ("ppl_corpus", "stats_corpus", "sequential_ppl_corpus"):
        corpora[name] = None if given[name] is None else _corpus(config, str(given[name][0]), given[name][1])
        if corpora[name] is not None:
            _validate_corpus(corpora[name], origin(given, name), str(given[name][0]))
    report_md = path("report", DEFAULT_REPORT)
    # a report written elsewhere takes its results along (out/r.md -> out/r.json): a quick run with its own report
    # must not overwrite the JSON of the run whose markdown stays in reports/, leaving the two disagreeing
    moved_report = given["report"] is not None and given["json"] is None
    report_json = report_md.with_suffix(".json") if moved_report else path("json", DEFAULT_JSON)
    if report_md.resolve() == report_json.resolve():
        # one would overwrite the other: the certificate must not be the markdown, nor the reverse
        beside = " (the JSON goes beside the report, with its name and .json, unless given)" if moved_report else ""
        raise pytest.UsageError(f"{origin(given, 'json')} and {origin(given, 'report')} name the same file "
                                f"{report_json}{beside}: the JSON results and the markdown report need a file each")
    return Settings(
        editors=_editor_names(_split(value("editor", "all")), origin(given, "editor")),
        models=tuple(_split(value("model", DEFAULT_MODEL))),
        cases=tuple(_split(value("cases", DEFAULT_CASES))),
        ppl_corpus=corpora["ppl_corpus"],
        stats_corpus=corpora["stats_corpus"],
        bounds=bounds,
        sequential=bool(value("sequential", False)),
        report_md=report_md,
        report_json=report_json,
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
        allow_missing=bool(value("allow_missing", False)),
        restore_check=value("restore_check", "full"),
        strip_bos=bool(value("strip_bos", False)),
        batch_size=value("batch_size", 1),
        search_batch=value("search_batch"),
        measure_alone=bool(value("measure_alone", False)),
        ppl_full_pass=bool(value("ppl_full_pass", False)),
        downstream=_downstream_tasks(_split(value("downstream", [])), origin(given, "downstream")),
        downstream_limit=value("downstream_limit"),
        sequential_edits=value("sequential_edits"),
        sequential_every=value("sequential_every"),
        sequential_ppl_corpus=corpora["sequential_ppl_corpus"],
    )


def _downstream_tasks(requested: Sequence[str], origin: str) -> tuple[str, ...]:
    """The downstream task names, refused at once (exit 4) where lm-eval is not installed to run them."""
    tasks = tuple(dict.fromkeys(requested))
    if tasks:
        from pytest_editsafety.downstream import DownstreamError, require_lm_eval

        try:
            require_lm_eval()
        except DownstreamError as err:
            raise pytest.UsageError(f"{origin}: {err}") from None
    return tasks


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


def _editor_hparams(config: pytest.Config, given: tuple[Any, str] | None
                    ) -> tuple[tuple[str, tuple[Path, ...]], ...]:
    """``--editsafety-hparams EDITOR=FILE`` values (else the ini's lines) as (editor, files) pairs: an editor given
    several times layers its files (and named sets) in the order given, each over the one before. Each file is read
    and checked once here (a built-in's keys and their types, a third-party editor's by its own factory; what
    depends on the model, such as a layer's range, when the model loads) so that a typo is a usage error now, not an
    error in every test of the editor."""
    if given is None:
        return ()
    from editors.hparams import HparamsError, named_hparams_sets, schema_for
    from editors.registry import EditorRegistryError, available_editors, check_user_hparams

    values, origin = given
    try:
        known = available_editors()
    except EditorRegistryError as err:
        raise pytest.UsageError(f"{origin}: {err}") from None
    pairs: dict[str, list[Path]] = {}
    named: set[tuple[str, Path]] = set()  # (editor, named set): the project's own files, pinned by its tests
    for value in values:
        editor, sep, file = (part.strip() for part in value.partition("="))
        if not sep or not editor or not file:
            raise pytest.UsageError(f"{origin}: expected EDITOR=FILE, got {value!r}")
        if editor not in known:
            raise pytest.UsageError(f"{origin}: unknown editor {editor!r} in {value!r}; available: {', '.join(known)}")
        path = _path(config, file, origin)
        named_sets = named_hparams_sets(editor) if schema_for(editor) is not None else ()
        is_named = not path.is_file() and file in named_sets  # a built-in named set (kmeng01), found per model later
        if not is_named and not path.is_file():
            raise pytest.UsageError(f"{origin}: {value!r}: no such file {path} (built-in named sets of "
                                    f"{editor}: {', '.join(named_sets) or 'none'})")
        layer = Path(file) if is_named else path
        if layer in pairs.get(editor, ()):
            raise pytest.UsageError(f"{origin}: {value!r} given twice")
        pairs.setdefault(editor, []).append(layer)
        if is_named:
            named.add((editor, layer))
    for editor, layers in pairs.items():
        files = [layer for layer in layers if (editor, layer) not in named]
        try:
            check_user_hparams(editor, files)
        except (HparamsError, EditorRegistryError) as err:
            raise pytest.UsageError(f"{origin}: {editor}: {err}") from None
    return tuple((editor, tuple(files)) for editor, files in pairs.items())


def _corpus(config: pytest.Config, text: str, where: str) -> str:
    """A corpus option's value: a known corpus name as given, anything else a path, relative to where pytest ran
    (command line) or to the ini file (ini), as every other path option."""
    from pytest_editsafety.corpora import known_corpus_names

    if text.strip().lower() in known_corpus_names():
        return text.strip()
    return str(_path(config, text, where))


def _validate_corpus(name: str, origin: str, given: str) -> None:
    from pytest_editsafety.corpora import CorpusError, known_corpus_names, load_corpus_path

    path = Path(name).expanduser()
    if path.is_dir():
        # a datasets directory is read when C is computed; here only its shape is checked, not its texts
        if not any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
            raise pytest.UsageError(f"{origin}: directory {path} was not written by datasets' save_to_disk "
                                    f"(no state.json or dataset_dict.json)")
        return
    if path.exists():
        try:
            load_corpus_path(path)
        except CorpusError as err:
            raise pytest.UsageError(f"{origin}: {err}") from None
        return
    if name.strip().lower() not in known_corpus_names():
        raise pytest.UsageError(
            f"{origin}: {given!r} is neither an existing corpus file or directory ({name}) nor a known corpus "
            f"({', '.join(known_corpus_names())})"
        )


def plan_for(settings: Settings, given: Given) -> Any:
    """The run's plan (``pytest_editsafety.plan.Plan``); a bad selection is a ``pytest.UsageError``."""
    from pytest_editsafety.cases import CaseValidationError
    from pytest_editsafety.plan import PlanError, build_plan

    try:
        return build_plan(settings.editors, settings.models, settings.cases, ppl_corpus=settings.ppl_corpus,
                          limit=settings.limit, sequential=settings.sequential,
                          sequential_edits=settings.sequential_edits,
                          sequential_ppl_corpus=settings.sequential_ppl_corpus, batch_size=settings.batch_size)
    except PlanError as err:
        raise pytest.UsageError(str(err)) from None
    except CaseValidationError as err:
        raise pytest.UsageError(f"{origin(given, 'cases')}: {err}") from None
    except ValueError as err:  # unknown or unsupported models name themselves
        raise pytest.UsageError(f"{origin(given, 'model')}: {err}") from None


def given_options(config: pytest.Config) -> Given:
    """Every option's (value, where it was set), None when unset."""
    return {option.name: _given(config, option) for option in OPTIONS}
