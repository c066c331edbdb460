"""The plugin touches nothing it was not asked to: installed, it leaves other projects' runs alone, and it
activates (options checked, plan built, xdist roles taken) only when an editsafety option is set or a test
asks for a certification fixture. Plus the option names, their ini twins and their checks.

Every run here is a pytester project without a model: a plan needs none, and the one xdist comparison runs
two workers over trivial tests.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest

from editors.registry import available_editors
from pytest_editsafety import plugin
from pytest_editsafety.plan import build_plan
from pytest_editsafety.plugin import get_plan, get_settings
from tests.editor_packages import write_editor_package

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suites" / "test_certify.py"

UNRELATED = '''
import pytest

@pytest.mark.fuzz
def test_their_fuzz():
    pass

def test_plain():
    pass
'''

EDITOR_SOURCE = '''
def make(hparams, **kwargs):
    raise AssertionError("never built: the run only lists editors")
'''

# Records, on each process of an xdist run, what the plugin may have changed there.
RECORDER = '''
import json, os
from pathlib import Path

def pytest_sessionfinish(session):
    config = session.config
    role = config.workerinput["workerid"] if hasattr(config, "workerinput") else "controller"
    seen = {
        "dist": config.getoption("dist"),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "omp": os.environ.get("OMP_NUM_THREADS"),
        "plugins": sorted(name for name, _ in config.pluginmanager.list_name_plugin()
                          if name and name.startswith("editsafety")),
    }
    (Path(os.environ["RECORD_DIR"]) / f"{role}.json").write_text(json.dumps(seen))
'''

OLD_NAMES = ["--dtype=float32", "--device-map=auto", "--sequential", "--stats-dir=.", "--stats-corpus=x",
             "--ppl-corpus=x", "--max-ppl-ratio=2", "--collapse-ppl=100", "--min-denominator-fraction=0.1",
             "--min-denominator-abs=1", "--min-efficacy=0", "--min-generalization=0", "--min-locality=0",
             "--metric-family=easyedit", "--fuzz-examples=3", "--fuzz-max-runs=9", "--fuzz-out=x.json"]


@pytest.fixture()
def unrelated(pytester: pytest.Pytester) -> pytest.Pytester:
    """Another project: its own ``fuzz`` marker, no editsafety option anywhere."""
    pytester.makeini("[pytest]\nmarkers =\n    fuzz: their own slow tests\n")
    pytester.makepyfile(test_theirs=UNRELATED)
    return pytester


@pytest.fixture()
def clashing_editors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two installed distributions registering one editor name: listing the editors is an error."""
    root = tmp_path / "clash"
    root.mkdir()
    write_editor_package(root, "editsafety_twin_a", EDITOR_SOURCE, {"twin": "make"})
    write_editor_package(root, "editsafety_twin_b", EDITOR_SOURCE, {"twin": "make"})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    with pytest.raises(ValueError, match="'twin' is registered by both"):
        available_editors()


def _environment() -> dict[str, str]:
    # an inner pytest run clears the outer test's PYTEST_CURRENT_TEST on its way out
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


# ---------------------------------------------------------------------------------------------- inert


def test_an_unrelated_run_keeps_its_fuzz_marker_and_builds_nothing(
    unrelated: pytest.Pytester, clashing_editors: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pytest_editsafety.plan

    def no_plan(*args, **kwargs):
        raise AssertionError("the plugin built a plan in a run that did not ask for one")

    monkeypatch.setattr(pytest_editsafety.plan, "build_plan", no_plan)
    before = _environment()
    result = unrelated.runpytest("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2)  # their fuzz test ran, and the clashing editors went unnoticed
    assert _environment() == before
    selected = unrelated.runpytest("-p", "no:cacheprovider", "-m", "fuzz")
    selected.assert_outcomes(passed=1, deselected=1)  # their marker, their -m


def test_an_option_makes_the_plugin_check_the_editors(unrelated: pytest.Pytester, clashing_editors: None) -> None:
    result = unrelated.runpytest("-p", "no:cacheprovider", "--editsafety-limit=1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--editor: editor 'twin' is registered by both" in result.stderr.str()


def test_a_project_with_its_own_editors_package_keeps_it_and_hears_why_when_it_asks_for_a_certification(
    pytester: pytest.Pytester,
) -> None:
    """This project's algorithms are the top-level package ``editors``; a project of the same package name runs
    its own tests with the plugin installed (nothing of ours is imported at start), and a certification asked for
    there stops with a usage error naming both packages instead of a missing module. In a fresh interpreter:
    ``python -m pytest`` puts the project first on the path, as a user's run does."""
    ours = str(REPO / "editors")
    pytester.makepyfile(**{"editors/__init__.py": "", "editors/mine.py": "NAME = 'theirs'\n",
                           "test_theirs.py": "import sys\nfrom editors.mine import NAME\n\n"
                                             "def test_theirs():\n    assert NAME == 'theirs'\n"
                                             "    loaded = [getattr(m, '__file__', None) or '' for n, m in "
                                             "sys.modules.items() if n.split('.')[0] == 'editors']\n"
                                             f"    assert not [f for f in loaded if f.startswith({ours!r})], loaded\n"})
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1)
    asked = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--editor=rome", "--model=tiny-gpt2",
                                          "--collect-only", timeout=120)
    assert asked.ret == pytest.ExitCode.USAGE_ERROR
    asked.stderr.fnmatch_lines(["*the package 'editors' that Python finds first is *, not pytest-editsafety's*"])


def test_a_collected_certification_suite_activates_the_plugin_and_its_errors_exit_4(
    pytester: pytest.Pytester, clashing_editors: None,
) -> None:
    # no option: the plan is built while collecting, from the defaults; pytest would report an error raised
    # there as a collection error (exit 2), the plugin raises it once collection is done
    pytester.makepyfile(test_certify=SUITE.read_text())
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--editor: editor 'twin' is registered by both" in result.stderr.str()


def test_an_xdist_worker_reports_that_error_as_a_collection_error(
    pytester: pytest.Pytester, clashing_editors: None,
) -> None:
    # xdist's controller would take a usage error raised after a worker's collection for a crash
    pytester.makepyfile(test_certify=SUITE.read_text())
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", timeout=300)
    assert result.ret not in (pytest.ExitCode.OK, pytest.ExitCode.INTERNAL_ERROR)
    result.stdout.fnmatch_lines(["*UsageError: --editor: editor 'twin' is registered by both*"])


def test_a_collected_certification_suite_is_parametrized_from_the_defaults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_certify=SUITE.read_text())
    result = pytester.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK
    ids = [line for line in result.outlines if "::" in line]
    expected = build_plan(available_editors(), ["tiny-gpt2"], ["hard", "normal"]).items
    assert len(ids) == len(expected) and f"test_certify.py::test_edit_is_safe[{expected[0].test_id}]" in ids


def test_only_our_fuzz_marker_is_deselected(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_ours="import pytest\n\n@pytest.mark.editsafety_fuzz\ndef test_search():\n    pass\n\n"
                                  "def test_other():\n    pass\n")
    bare = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers")
    bare.assert_outcomes(passed=1, deselected=1)
    named = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers", "-m", "editsafety_fuzz")
    named.assert_outcomes(passed=1, deselected=1)


def test_xdist_keeps_its_defaults_unless_the_run_is_owned(
    unrelated: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    unrelated.makeconftest(RECORDER)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def run(*extra: str) -> dict[str, dict]:
        records = tmp_path / f"records{len(extra)}"
        records.mkdir()
        monkeypatch.setenv("RECORD_DIR", str(records))
        result = unrelated.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", *extra, timeout=300)
        result.assert_outcomes(passed=2)
        return {path.stem: json.loads(path.read_text()) for path in records.glob("*.json")}

    theirs = run()
    assert set(theirs) == {"controller", "gw0", "gw1"}
    assert theirs["controller"]["dist"] == "load"  # xdist's own default, not loadgroup
    for worker in ("gw0", "gw1"):
        assert theirs[worker]["cuda"] == "3,7" and theirs[worker]["omp"] is None  # not pinned
    assert all(seen["plugins"] == ["editsafety"] for seen in theirs.values())  # no role was registered

    ours = run("--editsafety-limit=1")
    # xdist's load scheduling spreads each (editor, model) over every worker; the workers are pinned
    assert ours["controller"]["dist"] == "load"
    assert ours["controller"]["plugins"] == ["editsafety", "editsafety-controller", "editsafety-xdist-controller"]
    assert sorted(ours[w]["cuda"] for w in ("gw0", "gw1")) == ["3", "7"]
    assert all(ours[w]["plugins"] == ["editsafety", "editsafety-xdist-worker"] for w in ("gw0", "gw1"))


def test_auto_workers_are_the_gpu_count_only_in_owned_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4")
    assert plugin.pytest_xdist_auto_num_workers(pytester.parseconfig()) is None  # xdist counts CPUs
    assert plugin.pytest_xdist_auto_num_workers(pytester.parseconfig("--editsafety-limit=1")) == 5
    pytester.makeini("[pytest]\neditsafety_model = tiny-gpt2\n")
    assert plugin.pytest_xdist_auto_num_workers(pytester.parseconfig()) == 5  # an ini twin is an option too


def test_an_unowned_xdist_controller_activates_on_the_first_record(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfigure()
    assert config.pluginmanager.get_plugin(plugin.CONTROLLER_PLUGIN) is None
    worker = types.SimpleNamespace(config=config)
    items = build_plan(available_editors(), ["tiny-gpt2"], ["hard", "normal"]).items
    crashed, recorded = items[0].test_id, items[1].test_id

    def report(test_id: str, when: str, outcome: str, properties: list) -> pytest.TestReport:
        made = pytest.TestReport(f"test_certify.py::test_edit_is_safe[{test_id}]", ("test_certify.py", 0, ""),
                                 {}, outcome, "boom", when, user_properties=properties)
        made.node = worker  # as xdist's controller does
        return made

    plugin.pytest_runtest_logreport(report(crashed, "???", "failed", []))  # before any record: kept
    assert config.pluginmanager.get_plugin(plugin.CONTROLLER_PLUGIN) is None
    plugin.pytest_runtest_logreport(report(recorded, "call", "passed", [
        (plugin.RECORD_PROPERTY, {"test_id": recorded, "outcome": "passed"})]))
    controller = config.pluginmanager.get_plugin(plugin.CONTROLLER_PLUGIN).controller
    assert controller.records[recorded] == {"test_id": recorded, "outcome": "passed"}
    assert controller.records[crashed]["outcome"] == "error"
    assert "crashed" in controller.records[crashed]["violations"][0]


# ---------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("old", OLD_NAMES)
def test_unprefixed_names_are_not_ours(pytester: pytest.Pytester, old: str) -> None:
    result = pytester.runpytest("-p", "no:cacheprovider", old)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert f"unrecognized arguments: {old}" in result.stderr.str()


def _write_inputs(root: Path) -> dict[str, Path]:
    files = {"corpus": root / "corpus.json", "stats": root / "stats", "hparams": root / "rome.json"}
    files["corpus"].write_text(json.dumps([{"Corpus": "t", "Text": "A small dog sleeps under the table."}]))
    files["stats"].mkdir()
    files["hparams"].write_text("{}")
    return files


SETTINGS = {
    "editor": "rome", "model": "tiny-gpt2", "cases": "normal", "limit": "2", "sequential": "true",
    "max_ppl_ratio": "1.25", "collapse_ppl": "inf", "min_denominator_fraction": "0.2", "min_denominator_abs": "0.01",
    "min_efficacy": "0.9", "min_generalization": "0.3", "min_locality": "0.6", "metric_family": "easyedit",
    "report": "out/r.md", "json": "out/r.json", "dtype": "float32", "device_map": "cpu", "hparams": "rome=rome.json",
    "ppl_corpus": "corpus.json", "stats_corpus": "organism-ppl", "stats_dir": "stats", "cache": "cache",
    "fuzz_examples": "5", "fuzz_max_runs": "7", "fuzz_out": "out/fuzz.json", "allow_missing": "true",
}
SWITCHES = ("sequential", "allow_missing")
FLAGS = {"editor": "--editor", "model": "--model", "cases": "--cases"}


@pytest.mark.parametrize("where", ["command line", "ini file"])
def test_every_option_and_its_ini_twin_reach_the_settings(pytester: pytest.Pytester, where: str) -> None:
    _write_inputs(pytester.path)
    if where == "ini file":
        pytester.makeini("[pytest]\n" + "".join(f"editsafety_{name} = {value}\n" for name, value in SETTINGS.items()))
        args: list[str] = []
    else:
        flags = {name: FLAGS.get(name, "--editsafety-" + name.replace("_", "-")) for name in SETTINGS}
        args = [flags[name] if name in SWITCHES else f"{flags[name]}={value}" for name, value in SETTINGS.items()]
    before = _environment()
    config = pytester.parseconfigure(*args)
    s = get_settings(config)
    root = pytester.path
    assert (s.editors, s.models, s.cases, s.limit, s.sequential) == (("rome",), ("tiny-gpt2",), ("normal",), 2, True)
    b = s.bounds
    assert (b.max_ppl_ratio, b.collapse_ppl, b.min_denominator_fraction, b.min_denominator_abs) == (
        1.25, float("inf"), 0.2, 0.01)
    assert (b.min_efficacy, b.min_generalization, b.min_locality, b.metric_family) == (0.9, 0.3, 0.6, "easyedit")
    assert (s.report_md, s.report_json, s.fuzz_out) == (root / "out/r.md", root / "out/r.json", root / "out/fuzz.json")
    assert (s.dtype, s.device_map, s.stats_dir, s.stats_corpus) == ("float32", "cpu", root / "stats", "organism-ppl")
    assert s.ppl_corpus == str(root / "corpus.json") and s.editor_hparams == (("rome", (root / "rome.json",)),)
    assert (s.fuzz_examples, s.fuzz_max_runs, s.cache_root, s.allow_missing) == (5, 7, root / "cache", True)
    assert len(get_plan(config).items) == 2 + 1
    assert _environment() == before  # the cache root travels in the settings, not the environment


def test_native_toml_twins_take_their_types(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml('[tool.pytest]\neditsafety_editor = ["rome", "memit"]\neditsafety_limit = 2\n'
                               'editsafety_min_efficacy = 1\neditsafety_sequential = true\n')
    s = get_settings(pytester.parseconfigure())
    assert (s.editors, s.limit, s.bounds.min_efficacy, s.sequential) == (("rome", "memit"), 2, 1.0, True)
    pytester.makepyprojecttoml('[tool.pytest]\neditsafety_limit = "2"\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "ini editsafety_limit: " in result.stderr.str() and "expects an int" in result.stderr.str()


def test_the_cache_root_reaches_the_hub(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hub="def test_hub(editsafety_hub, pytestconfig):\n"
                                 "    assert editsafety_hub.options.cache_root == str(pytestconfig.rootpath / 'c')\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--editsafety-cache=c", "--editor=rome", "--cases=normal")
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize(("args", "ini", "message"), [
    (["--editsafety-dtype=float8"], "", "argument --editsafety-dtype: unsupported value 'float8'"),
    (["--editsafety-min-efficacy=1.5"], "", "argument --editsafety-min-efficacy: bound 'min_efficacy': must be a"),
    (["--editsafety-metric-family=bleu"], "", "argument --editsafety-metric-family: bound 'metric_family'"),
    (["--editsafety-collapse-ppl=nan"], "", "argument --editsafety-collapse-ppl: bound 'collapse_ppl'"),
    (["--editsafety-fuzz-max-runs=x"], "", "argument --editsafety-fuzz-max-runs: expected an integer, got 'x'"),
    (["--editsafety-fuzz-examples=0"], "", "argument --editsafety-fuzz-examples: must be at least 1, got 0"),
    (["--editsafety-stats-dir=nowhere"], "", "--editsafety-stats-dir: "),
    ([], "editsafety_dtype = float8", "ini editsafety_dtype: unsupported value 'float8'"),
    ([], "editsafety_min_locality = 2", "ini editsafety_min_locality: bound 'min_locality': must be a share"),
    ([], "editsafety_max_ppl_ratio = lots", "ini editsafety_max_ppl_ratio: "),
    ([], "editsafety_limit = many", "ini editsafety_limit: "),
    ([], "editsafety_fuzz_examples = 0", "ini editsafety_fuzz_examples: must be at least 1, got 0"),
    ([], "editsafety_sequential = perhaps", "ini editsafety_sequential: "),
    ([], "editsafety_stats_dir = nowhere", "ini editsafety_stats_dir: "),
    ([], "editsafety_editor = nope", "ini editsafety_editor: unknown editor 'nope'"),
    ([], "editsafety_ppl_corpus = no-such-corpus", "ini editsafety_ppl_corpus: 'no-such-corpus' is neither"),
    (["--editsafety-json=out/r", "--editsafety-report=out/./r"], "",
     "--editsafety-json and --editsafety-report name the same file"),
    (["--editsafety-json=reports/editsafety.md"], "", "--editsafety-json and --editsafety-report name the same file"),
    (["--editsafety-report=out/r.json"], "", "r.json (the JSON goes beside the report, with its name and .json, unless given)"),
    ([], "editsafety_json = r.txt\neditsafety_report = r.txt",
     "ini editsafety_json and ini editsafety_report name the same file"),
])
def test_bad_values_exit_4_naming_the_option(pytester: pytest.Pytester, args: list[str], ini: str,
                                              message: str) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_help_lists_the_option_groups_and_ini_twins(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines([
        "editsafety: selection:", "*--editor=NAME*", "*--editsafety-sequential*",
        "editsafety: bounds:", "*--editsafety-min-efficacy=X*", "*--editsafety-metric-family=FAMILY*",
        "editsafety: outputs:", "*--editsafety-report=PATH*",
        "editsafety: loading:", "*--editsafety-dtype=DTYPE*", "*--editsafety-cache=PATH*",
        "editsafety: fuzz:", "*--editsafety-fuzz-examples=N*",
        "*editsafety_editor (linelist):*", "*editsafety_limit (int):*", "*editsafety_sequential (bool):*",
        "*editsafety_min_efficacy (float):*",
    ])


def test_an_ini_corpus_path_is_relative_to_the_ini_file(pytester: pytest.Pytester) -> None:
    import json

    pytester.makeini("[pytest]\neditsafety_ppl_corpus = data/ppl.json\n")
    data = pytester.mkdir("data")
    (data / "ppl.json").write_text(json.dumps([{"Corpus": "t", "Text": "A river runs past the mill."}]))
    sub = pytester.mkdir("sub")
    pytester.makepyfile(**{"sub/test_x.py": "def test_x():\n    pass\n"})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        result = pytester.runpytest("-p", "no:cacheprovider", "--co", "-q")
    assert result.ret != pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    result.stdout.fnmatch_lines(["*test_x*"])
