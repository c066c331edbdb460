"""The pytest plugin end to end (pytester), plus the plan and the xdist glue as plain functions.

Runs that edit a model use a micro organism built once per session (the organism's real build path, two
layers of width 32, seconds to train), a six-sentence perplexity corpus and one or two cases, so each run
takes seconds. Editors registered for the tests (a no-op, and one that kills its worker on one subject)
come in through an entry point, as a third-party package's would. Only the test marked ``organism``
touches the real tiny-gpt2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from editors.registry import available_editors
from pytest_editsafety import xdist_glue
from pytest_editsafety.cases import CaseSet, EditCase
from pytest_editsafety.devices import device_label
from editors.storage import slugify
from pytest_editsafety.plan import PlanError, build_plan
from pytest_editsafety.plugin import get_plan, get_settings
from pytest_editsafety.results import Shard, read_result, write_result
from tests.editor_packages import write_editor_package
from tests.results_helpers import WHOLE_SESSION, plan_of

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "suites" / "test_certify.py"
ID_CHARS = re.compile(r"^[A-Za-z0-9._-]+$")

FAKE_EDITORS = '''
import os
from editors.base import EditorBase, EditOutcome

class Noop(EditorBase):
    """Changes nothing: perfectly safe, and certification must still refuse it (the edit never takes)."""
    def __init__(self, name, crash_subject=None):
        self.name = name
        self.hparams = {}
        self.crash_subject = crash_subject
    def parameters_touched(self, model, family):
        return ()
    def apply(self, model, tokenizer, family, requests):
        if self.crash_subject is not None and requests[0].subject == self.crash_subject:
            os._exit(3)  # a worker dying mid-test, as an OOM kill or a segfault would
        return EditOutcome(edited=())

class Where(Noop):
    """Changes nothing and reports the GPU its xdist worker was pinned to, as a metric of every record."""
    def apply(self, model, tokenizer, family, requests):
        return EditOutcome(edited=(), diagnostics={"visible_gpu": int(os.environ["CUDA_VISIBLE_DEVICES"])})

def make_noop(hparams):
    return Noop("noop")

def make_where(hparams):
    return Where("where")

def make_crasher(hparams):
    return Noop("noop-crash", crash_subject="Crashwell")

def make_strict(hparams):
    """A third-party editor that needs one hyper-parameter and refuses any other, as the example package does."""
    unknown = sorted(set(hparams) - {"strength"})
    if unknown:
        raise ValueError(f"strict: unknown hyper-parameter(s) {', '.join(unknown)}; known: strength")
    if "strength" not in hparams:
        raise ValueError("strict: strength is required")
    return Noop("strict")
'''

SENTENCES = (
    "The river runs past the old mill and into the valley.",
    "A small dog sleeps under the table all afternoon.",
    "People often walk to the market on sunny days.",
    "The teacher wrote a long list on the board.",
    "Rain fell over the quiet town for most of the night.",
    "She opened the window and looked at the garden.",
)


# ---------------------------------------------------------------------------------------------- fixtures



@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "tiny_corpus.json"
    path.write_text(json.dumps([{"Corpus": "test", "Text": t} for t in SENTENCES]))
    return path


@pytest.fixture(scope="session")
def fake_editors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that, on sys.path, makes the editors ``noop``, ``noop-crash`` and ``where`` installed."""
    return write_editor_package(tmp_path_factory.mktemp("fake-editors"), "editsafety_fake_editors", FAKE_EDITORS,
                                {"noop": "make_noop", "noop-crash": "make_crasher", "where": "make_where",
                                 "strict": "make_strict"})


@pytest.fixture()
def editors_installed(fake_editors: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.syspath_prepend(str(fake_editors))
    yield fake_editors
    sys.modules.pop("editsafety_fake_editors", None)


@pytest.fixture()
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Micro models run far faster on one thread, and on a shared 2-core machine many times faster."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the subprocess runs
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def isolated(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
             one_torch_thread: None) -> pytest.Pytester:
    """A pytester directory holding the certification suite, with a private cache root."""
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    pytester.makepyfile(test_certify=SUITE.read_text())
    return pytester


def preferred_first(model_dir: Path, prompt: str, subject: str, a: str, b: str) -> tuple[str, str]:
    """(answer the unedited model prefers, the other): a no-op "edit" towards the other never takes."""
    from pytest_editsafety.metrics import Continuation, answer_scores
    from pytest_editsafety.registry import load_model

    loaded = load_model(str(model_dir))
    text = prompt.replace("{}", subject, 1)
    (score_a, _), (score_b, _) = answer_scores(loaded.model, loaded.tokenizer,
                                               [Continuation(text, a), Continuation(text, b)])
    return (a, b) if score_a >= score_b else (b, a)


def write_cases(path: Path, cases: list[dict]) -> Path:
    path.write_text(json.dumps(cases, indent=1))
    return path


def run_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [f"--model={model}", f"--editsafety-ppl-corpus={corpus}", f"--editsafety-report={out / 'r.md'}",
            f"--editsafety-json={out / 'r.json'}", "-p", "no:cacheprovider", *extra]


# ---------------------------------------------------------------------------------------------- the plan


def _case_set(name: str, ids: list[str]) -> CaseSet:
    cases = tuple(EditCase(case_id=i, subject="Alpha", prompt="{} lives in", target_new="Paris",
                           ground_truth="Rome") for i in ids)
    return CaseSet(name=name, cases=cases, source=f"/data/{name}.json", format="canonical")


@settings(max_examples=40, deadline=None)
@given(
    ids_a=st.lists(st.text(min_size=1, max_size=12).filter(str.strip), min_size=1, max_size=6, unique=True),
    ids_b=st.lists(st.text(min_size=1, max_size=12).filter(str.strip), min_size=1, max_size=6, unique=True),
    editors=st.lists(st.sampled_from(["rome", "c-rome", "my editor/v2", "memit"]), min_size=1, max_size=3),
)
def test_plan_ids_are_unique_safe_and_deterministic(ids_a: list[str], ids_b: list[str], editors: list[str]) -> None:
    sets = {"one": _case_set("one", ids_a), "two words": _case_set("two words", ids_b)}
    make = lambda: build_plan(editors, ["tiny-gpt2"], ["one", "two words"], resolve=sets.__getitem__,  # noqa: E731
                              sequential=True)
    plan = make()
    ids = [item.test_id for item in plan.items]
    assert len(ids) == len(set(ids))
    assert all(ID_CHARS.match(i) for i in ids)
    assert [i.test_id for i in make().items] == ids
    n_editors = len(set(editors))
    assert len(ids) == n_editors * (len(ids_a) + len(ids_b) + 2)


def test_plan_ids_follow_the_documented_shape() -> None:
    plan = build_plan(["rome", "c-rome"], ["tiny-gpt2"], ["hard", "real-normal"], limit=8, sequential=True)
    ids = [item.test_id for item in plan.items]
    assert "rome-tiny-gpt2-hard-0007" in ids  # the organism's ids already name their set
    assert "c-rome-tiny-gpt2-real-normal-0003" in ids  # file ids numbered from 0 get the set's name
    assert "c-rome-tiny-gpt2-seq-hard" in ids
    # case-major: each case's editors in a row (where they share a measurement), the sequential runs last
    assert ids[:4] == ["rome-tiny-gpt2-hard-0000", "c-rome-tiny-gpt2-hard-0000", "rome-tiny-gpt2-hard-0001",
                       "c-rome-tiny-gpt2-hard-0001"]
    assert ids.index("c-rome-tiny-gpt2-real-normal-0007") < ids.index("rome-tiny-gpt2-seq-hard")


def test_organisms_take_c_from_other_text_than_their_perplexity_corpus() -> None:
    # ROME takes C from Wikipedia and the papers score ME-PPL: C fitted to the scored sentences would whiten
    # the update against exactly the keys perplexity reads
    organism = build_plan(["rome"], ["tiny-gpt2"], ["hard"]).models[0]
    assert (organism.ppl_corpus, organism.stats_corpus) == ("organism-ppl", "organism-wiki")
    chosen = build_plan(["rome"], ["tiny-gpt2"], ["hard"], ppl_corpus="me-ppl-50").models[0]
    assert (chosen.ppl_corpus, chosen.stats_corpus) == ("me-ppl-50", "organism-wiki")
    real = build_plan(["rome"], ["gpt2-xl"], ["real-hard"]).models[0]
    # C from real text, never the perplexity corpus, unless --editsafety-stats-corpus/-dir says otherwise
    assert (real.ppl_corpus, real.stats_corpus) == ("me-ppl-50", "wikitext-103")
    assert build_plan(["rome"], ["gpt2-xl"], ["real-hard"], ppl_corpus="me-ppl-1k").models[0].stats_corpus == "wikitext-103"


@pytest.mark.parametrize(("stats_corpus", "expected"), [(None, "organism-wiki"), ("organism-ppl", "organism-ppl")])
def test_the_hub_computes_c_over_the_models_stats_corpus(monkeypatch: pytest.MonkeyPatch, stats_corpus, expected):
    import editors.stats
    from pytest_editsafety.hub import HubOptions, ModelHub

    seen: dict = {}
    monkeypatch.setattr(editors.stats, "covariance_for",
                        lambda *args, corpus, **kwargs: seen.setdefault("corpus", corpus))
    hub = ModelHub(build_plan(["rome"], ["tiny-gpt2"], ["hard"], limit=1), HubOptions(stats_corpus=stats_corpus))
    state = types.SimpleNamespace(slug="tiny-gpt2", resources=None,
                                  loaded=types.SimpleNamespace(model=None, tokenizer=None, family=None, identity="x"))
    hub._resources(state).second_moment(0, 10)
    # handed over unresolved: only computing C from text reads the corpus
    assert callable(seen["corpus"]) and seen["corpus"]().name == expected


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"editors": []}, "no editor"),
    ({"models": [""]}, "no model"),
    ({"limit": 0}, "at least 1"),
])
def test_empty_selections_are_plan_errors(kwargs: dict, message: str) -> None:
    args = {"editors": ["rome"], "models": ["tiny-gpt2"], "case_sets": ["hard"], **kwargs}
    limit = args.pop("limit", None)
    with pytest.raises(PlanError, match=message):
        build_plan(args["editors"], args["models"], args["case_sets"], limit=limit)


@pytest.mark.parametrize(("text", "slug"), [
    ("tiny-gpt2", "tiny-gpt2"), ("a b|c", "a_b_c"), ("../x", "x"), ("[@]", "x"), ("hard-0007", "hard-0007")])
def test_slugify(text: str, slug: str) -> None:
    assert slugify(text) == slug


# ---------------------------------------------------------------------------------------------- xdist glue


@pytest.mark.parametrize(("value", "devices"), [
    ("0,1", ("0", "1")), ("2, 5", ("2", "5")), ("", ()), ("-1", ()), ("1,-1,2", ("1",)),
    ("GPU-8f2e,GPU-11aa", ("GPU-8f2e", "GPU-11aa")),
])
def test_visible_devices_follow_cuda_rules(value: str, devices: tuple[str, ...]) -> None:
    assert xdist_glue.parse_visible_devices(value) == devices
    assert xdist_glue.visible_gpus({"CUDA_VISIBLE_DEVICES": value}) == devices


def test_gpus_are_counted_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xdist_glue.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    listing = "GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n"
    monkeypatch.setattr(xdist_glue.subprocess, "run",
                        lambda *a, **k: types.SimpleNamespace(returncode=0, stdout=listing))
    assert xdist_glue.visible_gpus({}) == ("0", "1")
    monkeypatch.setattr(xdist_glue.shutil, "which", lambda name: None)
    assert xdist_glue.visible_gpus({}) == ()


def test_workers_get_devices_round_robin_and_auto_means_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    config = types.SimpleNamespace(stash=pytest.Stash())
    assert xdist_glue.auto_num_workers(config) == 2
    controller = xdist_glue.ControllerXdist()

    def start(worker: str) -> str:
        node = types.SimpleNamespace(config=config, gateway=types.SimpleNamespace(id=worker), workerinput={})
        controller.pytest_configure_node(node)
        return node.workerinput[xdist_glue.DEVICE_KEY]

    def down(worker: str) -> None:
        controller.pytest_testnodedown(types.SimpleNamespace(gateway=types.SimpleNamespace(id=worker)), None)

    assert [start(w) for w in ("gw0", "gw1", "gw2")] == ["3", "7", "3"]
    down("gw0")
    down("gw1")
    # xdist replaces a crashed worker under a new id: it takes a GPU left free, not gw3's round-robin turn
    assert start("gw3") == "7"
    assert start("gw4") == "3"

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cpu_config = types.SimpleNamespace(stash=pytest.Stash())
    assert xdist_glue.auto_num_workers(cpu_config) is None  # xdist keeps its CPU count
    assert xdist_glue.least_used_device((), ["cpu"]) == "cpu"


def test_a_worker_pins_itself_to_its_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,7")
    worker = types.SimpleNamespace(workerinput={xdist_glue.DEVICE_KEY: "7"})
    xdist_glue.WorkerXdist().pytest_configure(worker)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "7"


@pytest.mark.parametrize(("device", "visible", "label"), [
    ("cuda:0", "3", "cuda:0 (GPU 3)"), ("cuda:1", "3, 7", "cuda:1 (GPU 7)"), ("cuda:0", None, "cuda:0"),
    ("cuda:0", "GPU-8f2e", "cuda:0 (GPU-8f2e)"), ("cpu", "3", "cpu"), ("cuda:2", "3,7", "cuda:2"),
])
def test_a_records_device_names_the_gpu_a_pinned_worker_sees_as_cuda_0(device: str, visible: str | None,
                                                                        label: str) -> None:
    assert device_label(device, visible) == label


def test_collection_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    code = (
        "import sys, pytest\n"
        f"rc = pytest.main([{str(SUITE)!r}, '--collect-only', '-q', '-p', 'no:cacheprovider'])\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "sys.exit(10 + len(heavy) if heavy else int(rc))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- options


def test_options_and_ini_twins_parse(pytester: pytest.Pytester, micro_model: Path, corpus_file: Path) -> None:
    pytester.makeini(
        "[pytest]\n"
        "editsafety_editor = c-rome, rome\n"
        f"editsafety_model = tiny-gpt2\n    {micro_model}\n"
        "editsafety_cases = normal\n"
        "editsafety_max_ppl_ratio = 1.2\n"
        "editsafety_min_efficacy = 0.9\n"
        "editsafety_metric_family = easyedit\n"
        "editsafety_sequential = true\n"
        "editsafety_limit = 3\n"
        "editsafety_report = out/cert.md\n"
        f"editsafety_ppl_corpus = {corpus_file}\n"
        "editsafety_dtype = float32\n"
        "editsafety_hparams =\n    rome = kmeng01\n    rome = hp/rome.json\n    mend=hp/mend.json\n"
    )
    (pytester.path / "hp").mkdir()
    for name in ("rome", "mend"):
        (pytester.path / "hp" / f"{name}.json").write_text('{"_comment": "a user file"}')
    from_ini = pytester.parseconfigure()
    s = get_settings(from_ini)
    assert s.editors == ("c-rome", "rome")
    assert s.models == ("tiny-gpt2", str(micro_model))
    assert s.cases == ("normal",)
    assert (s.bounds.max_ppl_ratio, s.bounds.min_efficacy, s.bounds.metric_family) == (1.2, 0.9, "easyedit")
    assert s.bounds.min_locality == 0.5  # untouched bounds keep their defaults
    assert s.sequential and s.limit == 3 and s.dtype == "float32"
    assert s.report_md == pytester.path / "out" / "cert.md"  # ini paths are relative to the ini file
    # an editor given twice layers its named set and its file in that order
    assert s.editor_hparams == (("rome", (Path("kmeng01"), pytester.path / "hp" / "rome.json")),
                                ("mend", (pytester.path / "hp" / "mend.json",)))
    plan = get_plan(from_ini)
    assert len(plan.items) == 2 * 2 * (3 + 1)
    assert {m.ppl_corpus for m in plan.models} == {str(corpus_file)}

    # the command line wins over the ini file, option by option
    from_cli = pytester.parseconfigure("--editor=memit", "--editsafety-max-ppl-ratio=2", "--model=tiny-gpt2",
                                       "--model", "tiny-gptj,tiny-llama", "--editsafety-limit=1")
    s = get_settings(from_cli)
    assert s.editors == ("memit",)
    assert s.models == ("tiny-gpt2", "tiny-gptj", "tiny-llama")
    assert (s.bounds.max_ppl_ratio, s.bounds.min_efficacy, s.limit) == (2.0, 0.9, 1)


def test_a_report_written_elsewhere_takes_its_json_along_unless_the_json_is_named(pytester: pytest.Pytester) -> None:
    """A quick run with its own report must not overwrite the JSON beside the main run's report in reports/."""
    s = get_settings(pytester.parseconfigure("--editsafety-report=quick/r.md"))
    assert (s.report_md, s.report_json) == (pytester.path / "quick" / "r.md", pytester.path / "quick" / "r.json")
    s = get_settings(pytester.parseconfigure("--editsafety-report=quick/r.md", "--editsafety-json=elsewhere.json"))
    assert s.report_json == pytester.path / "elsewhere.json"
    s = get_settings(pytester.parseconfigure("--editsafety-json=quick/r.json"))  # the markdown does not follow
    assert s.report_md == pytester.path / "reports" / "editsafety.md"


def test_defaults_certify_every_builtin_editor_on_tiny_gpt2(pytester: pytest.Pytester) -> None:
    from editors.registry import available_editors

    s = get_settings(pytester.parseconfigure())
    assert s.editors == available_editors() and s.models == ("tiny-gpt2",) and s.cases == ("hard", "normal")
    assert s.report_json == pytester.path / "reports" / "editsafety.json"
    model = get_plan(pytester.parseconfigure()).models[0]
    assert model.ppl_corpus == "organism-ppl" and model.stats_corpus == "organism-wiki"


@pytest.mark.parametrize(("args", "message"), [
    (["--editor=nope"], "unknown editor 'nope'"),
    (["--editor=,"], "empty selection: no editor"),
    (["--model=./no/such/model"], "no/such/model"),
    (["--cases={broken}"], "broken_cases.json"),
    (["--cases={empty}"], "empty_cases.json"),
    (["--editsafety-limit=0"], "at least 1"),
    (["--editsafety-sequential", "--editsafety-sequential-edits=0"], "--editsafety-sequential-edits: must be at least 1"),
    # more edits than the set holds: named with the set, and the limit when it is what narrows the set
    (["--editsafety-sequential", "--cases=hard", "--editsafety-sequential-edits=49"],
     "--editsafety-sequential-edits 49 exceeds the 48 cases of the set (case set 'hard')"),
    (["--editsafety-sequential", "--cases=hard", "--editsafety-limit=5", "--editsafety-sequential-edits=6"],
     "exceeds the 5 cases of the set (case set 'hard', as --editsafety-limit narrows it)"),
    (["--editsafety-sequential-every=often"], "--editsafety-sequential-every: expected an integer"),
    (["--editsafety-sequential-ppl-corpus=no-such-corpus"], "--editsafety-sequential-ppl-corpus"),
    (["--editsafety-max-ppl-ratio=lots"], "max_ppl_ratio"),
    (["--editsafety-ppl-corpus=no-such-corpus"], "no-such-corpus"),
    # the option that named the bad corpus, not its twin
    (["--editsafety-stats-corpus={broken}"], "--editsafety-stats-corpus"),
    (["--editsafety-json=out.x", "--editsafety-report=out.x"], "--editsafety-json and --editsafety-report name the "
                                                                "same file"),
    (["--editsafety-baseline={broken}"], "broken_cases.json"),
    (["--editsafety-hparams=mend"], "--editsafety-hparams: expected EDITOR=FILE, got 'mend'"),
    (["--editsafety-hparams=nope={empty}"], "unknown editor 'nope' in 'nope="),
    (["--editsafety-hparams=mend=no/such.json"], "'mend=no/such.json': no such file"),
    (["--editsafety-hparams=rome={broken}"], "expected a JSON object of hyper-parameters"),
    (["--editsafety-hparams=rome={valid}", "--editsafety-hparams=rome={valid}"], "hparams.json' given twice"),
    (["--editsafety-hparams=rome=kmeng01", "--editsafety-hparams=rome=kmeng01"], "'rome=kmeng01' given twice"),
    # a typo or a wrong type in the file is the run's usage error, not an error in every test of the editor
    (["--editsafety-hparams=rome={typo}"], "typo.json: unknown hyper-parameter 'layerz' for editor 'rome'"),
    (["--editsafety-hparams=rome={typed}"], "typed.json: v_num_grad_steps: expected an integer, got 'many'"),
    (["--editsafety-hparams=rome={scaled}"], "scaled.json: layer '17/0': 'K/N' is layer K of N layers, so K must be "
                                             "below N"),
    # a layer the model lacks, seen in its config before anything loads
    (["--editsafety-hparams=rome={deep}", "--model={micro}"],
     "deep.json: layer 99 is out of range for a model with 2 layers; set the layer with --editsafety-hparams rome=FILE"),
])
def test_usage_errors_exit_4_and_name_the_culprit(pytester: pytest.Pytester, args: list[str], message: str,
                                                  micro_model: Path) -> None:
    broken = pytester.path / "broken_cases.json"
    broken.write_text('[{"subject": "Alpha", "prompt": "no placeholder", "target_new": "x"}]')
    empty = pytester.path / "empty_cases.json"
    empty.write_text("[]")
    valid = pytester.path / "hparams.json"
    valid.write_text('{"layer": "causal", "v_lr": 0.5}')
    typo = pytester.path / "typo.json"
    typo.write_text('{"layerz": 3}')
    typed = pytester.path / "typed.json"
    typed.write_text('{"v_num_grad_steps": "many"}')
    deep = pytester.path / "deep.json"
    deep.write_text('{"layer": 99}')
    scaled = pytester.path / "scaled.json"
    scaled.write_text('{"layer": "17/0"}')
    pytester.makepyfile(test_certify=SUITE.read_text())
    result = pytester.runpytest(*[a.format(broken=broken, empty=empty, valid=valid, typo=typo, typed=typed, deep=deep, scaled=scaled,
                                           micro=micro_model) for a in args])
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert message in result.stderr.str()


def test_a_third_party_editors_hparams_file_is_checked_once_by_its_factory(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, editors_installed: Path, tmp_path: Path,
) -> None:
    typo = tmp_path / "strict.json"
    typo.write_text('{"_comment": "a typo", "strenght": 2}')
    args = run_args(micro_model, corpus_file, tmp_path / "out", "--editor=strict")
    result = isolated.runpytest(*args, f"--editsafety-hparams=strict={typo}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    stderr = result.stderr.str()
    assert f"{typo}: editor 'strict'" in stderr and "unknown hyper-parameter(s) strenght" in stderr
    assert "passed" not in result.stdout.str() and "failed" not in result.stdout.str()
    # several files are judged as the factory gets them, merged in order: the second alone would lack strength
    more = tmp_path / "more.json"
    more.write_text('{"_comment": "nothing new"}')
    layered = isolated.runpytest(*args, f"--editsafety-hparams=strict={more}", "--collect-only")
    assert layered.ret == pytest.ExitCode.USAGE_ERROR and "strict: strength is required" in layered.stderr.str()
    typo.write_text('{"strength": 2}')
    layered = isolated.runpytest(*args, f"--editsafety-hparams=strict={typo}", f"--editsafety-hparams=strict={more}",
                                 "--collect-only")
    assert layered.ret == pytest.ExitCode.OK, layered.stderr.str()
    typo.write_text('{"_comment": "fixed", "strength": 2}')  # the comment is the file's, never the factory's
    cases = write_cases(tmp_path / "one.json", [{"case_id": "one", "subject": "Alpha", "prompt": "{} lives in",
                                                  "target_new": "Paris", "ground_truth": "Rome"}])
    fixed = isolated.runpytest(*args, f"--editsafety-hparams=strict={typo}", f"--cases={cases}")
    # it runs (a no-op editor is never certified), and its certificate is written although the editor kept none of
    # the file's values as its hyper-parameters: no file is named for values the certificate does not hold
    assert fixed.ret == pytest.ExitCode.TESTS_FAILED, fixed.stderr.str()
    run = read_result(tmp_path / "out" / "r.json")
    assert [r.editor for r in run.cases] == ["strict"] and "strict" not in run.metadata.hparams_sources


def test_the_layer_check_reads_a_saved_config_that_names_its_own_path(micro_model: Path) -> None:
    """Configs saved by older transformers (and many on the hub) hold ``_name_or_path``; the check before a run
    looks the files up by the model's location all the same."""
    import json

    from pytest_editsafety.model_check import hparams_lookup_keys, layer_problems
    from pytest_editsafety.plan import build_plan
    from pytest_editsafety.registry import resolve_model

    config = json.loads((micro_model / "config.json").read_text())
    spec = resolve_model(str(micro_model))
    assert hparams_lookup_keys(spec, {**config, "_name_or_path": "elsewhere"}, "gpt2")
    plan = build_plan(["rome", "memit"], [str(micro_model)], ["normal"], limit=1)
    assert layer_problems(plan.models, plan.editors, {}, None) == []


def test_a_builtin_hub_models_layers_are_checked_against_its_published_depth(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 small, not in the (empty) Hugging Face cache: its family default's layers fit its published 12 layers
    ('17/48' is layer 4), and a user file's layer 20 is a problem before anything is downloaded."""
    from pytest_editsafety.model_check import known_config, layer_problems
    from pytest_editsafety.plan import build_plan

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    plan = build_plan(["rome", "memit", "mend"], ["gpt2"], ["normal"], limit=1)
    config, source, notes = known_config(plan.models[0].spec, None)
    assert config == {"model_type": "gpt2", "n_layer": 12} and "published" in source and "12 layers" in notes[0]
    assert layer_problems(plan.models, plan.editors, {}, None) == []
    deep = tmp_path / "deep.json"
    deep.write_text('{"layer": 20}')
    (problem,) = layer_problems(plan.models, plan.editors, {"rome": str(deep)}, None)
    assert problem.startswith(f"rome on gpt2: layer from {deep}: layer 20 is out of range for a model with 12 layers")
    # an editor without a file for the family (r-rome on Llama) leaves the others' layers checked
    deeper = tmp_path / "deeper.json"
    deeper.write_text('{"layer": 40}')
    llama = build_plan(["r-rome", "rome"], ["llama2-7b"], ["normal"], limit=1)
    (problem,) = layer_problems(llama.models, llama.editors, {"rome": str(deeper)}, None)
    assert problem.startswith("rome on llama2-7b: ") and "layer 40 is out of range for a model with 32 layers" in problem
    # a form no model takes is a problem too, not a skip
    whole = tmp_path / "whole.json"
    whole.write_text('{"layer": "48/48"}')
    (problem,) = layer_problems(plan.models, plan.editors, {"rome": str(whole)}, None)
    assert "'48/48': 'K/N' is layer K of N layers, so K must be below N" in problem


def test_ids_are_stable_across_collections(pytester: pytest.Pytester, micro_model: Path) -> None:
    pytester.makepyfile(test_certify=SUITE.read_text())
    args = ["--collect-only", "-q", "--editor=all", f"--model={micro_model}", "--model=tiny-gpt2",
            "--cases=hard,normal,real-hard", "--editsafety-limit=3", "--editsafety-sequential", "-p",
            "no:cacheprovider"]
    first = [line for line in pytester.runpytest(*args).outlines if "::" in line]
    second = [line for line in pytester.runpytest(*args).outlines if "::" in line]
    assert first == second
    micro = micro_model.name
    assert f"test_certify.py::test_edit_is_safe[c-rome-{micro}-hard-0002]" in first
    assert "test_certify.py::test_edit_is_safe[memit-tiny-gpt2-real-hard-0001]" in first
    assert "test_certify.py::test_edit_is_safe[rome-tiny-gpt2-seq-normal]" in first
    # every built-in editor x 2 models x (3 case sets x 3 cases + 3 sequential runs)
    assert len(first) == len(set(first)) == len(available_editors()) * 2 * (3 * 3 + 3)


# ---------------------------------------------------------------------------------------------- runs


def test_a_run_writes_the_report_and_a_valid_json(isolated: pytest.Pytester, micro_model: Path,
                                                   corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=c-rome", "--cases=hard,normal",
                                          "--editsafety-limit=1", "--editsafety-sequential"))
    # a quick run of 1 case per 48-case set: never a certificate, whatever its tests do
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*editsafety: *PARTIAL*", "*partial (limit): --editsafety-limit 1 planned 1 of 48 "
                                 "cases of hard, 1 of 48 cases of normal*", f"*report {out / 'r.md'}*"])
    run = read_result(out / "r.json")
    assert [gap.kind for gap in run.coverage.gaps] == ["limit"] and run.coverage.missing == ()
    micro = micro_model.name
    assert [r.test_id for r in run.cases] == [f"c-rome-{micro}-hard-0000", f"c-rome-{micro}-normal-0000"]
    assert [r.test_id for r in run.sequential] == [f"c-rome-{micro}-seq-hard", f"c-rome-{micro}-seq-normal"]
    assert run.metadata.models[micro].startswith("local:")
    assert set(run.metadata.hparams_hashes["c-rome"]) == {micro}
    # the values behind the hash, layers resolved: the run can be reviewed and rerun from its certificate
    values = run.metadata.hparams["c-rome"][micro]
    assert isinstance(values["layer"], int) and values["kl_prompt"] == "{} is a"
    assert run.metadata.corpus == "tiny_corpus" and len(run.metadata.corpus_sha256) == 64
    for record in run.cases:
        # both metric families, the ROME diagnostics and the model-derived floor travel as numbers
        for key in ("ppl_ratio", "ppl_edited", "ppl_unedited", "denominator", "numerator", "denominator_floor",
                    "cf_efficacy", "cf_locality", "ee_rewrite_acc", "ee_locality"):
            assert isinstance(record.metrics[key], float), key
        assert record.metrics["denominator_floor"] > 0
        # the test outcome and the recorded verdict agree
        assert record.outcome == ("passed" if record.certified else "failed")
    assert all(r.n_edits == 1 and len(r.ppl_after_each) == 1 for r in run.sequential)
    markdown = (out / "r.md").read_text()
    assert "c-rome" in markdown and "Sequential" in markdown
    assert "## Hyper-parameters" in markdown
    (row,) = [line for line in markdown.split("## Hyper-parameters")[1].splitlines() if line.startswith("| c-rome ")]
    assert micro in row and run.metadata.hparams_hashes["c-rome"][micro] in row and f"layer {values['layer']}," in row


def test_mend_trains_on_first_use_with_a_user_hparams_file_and_restores(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, tmp_path: Path,
) -> None:
    from dataclasses import asdict

    from editors.hparams import hparams_from_mapping, hparams_hash, load_hparams
    from editors.mend import MendHparams
    from pytest_editsafety.report.markdown import escape_md

    # a network of a few steps, so the organism's first-use training takes a second
    hparams = tmp_path / "mend-micro.json"
    hparams.write_text(json.dumps({"layers": [1], "rank": 8, "edit_lr": 1e-2, "lr": 1e-3, "steps": 4,
                                   "batch_size": 3, "norm_batches": 2}))
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": "one", "subject": "Alpha", "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"},
        {"case_id": "two", "subject": "Beta", "prompt": "{} works as a", "target_new": "doctor",
         "ground_truth": "baker"},
    ])
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=mend", f"--cases={cases}",
                                          f"--editsafety-hparams=mend={hparams}", f"--junitxml={out / 'j.xml'}"))
    assert result.ret in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED)
    run = read_result(out / "r.json")
    # edited, measured and restored bit-exactly (a restore that fails makes the test an error)
    assert [r.outcome in ("passed", "failed") for r in run.cases] == [True, True]
    assert all(r.metrics["delta_fro"] > 0 for r in run.cases)
    # the user file reached the editor: the recorded hash is that of the built-in file with the user's on top
    expected = hparams_from_mapping(MendHparams, load_hparams("mend", "tiny-gpt2", user_file=hparams))
    assert expected.steps == 4 and expected.c_loc == 1.0
    assert run.metadata.hparams_hashes["mend"][micro_model.name] == hparams_hash(asdict(expected))
    assert run.metadata.hparams["mend"][micro_model.name] == json.loads(json.dumps(asdict(expected)))
    # and the certificate says which file set each value: the user's for its keys, the built-in file the others
    sources = run.metadata.hparams_sources["mend"][micro_model.name]
    user_keys = {"layers", "rank", "edit_lr", "lr", "steps", "batch_size", "norm_batches"}
    assert {key for key, label in sources.items() if label == str(hparams)} == user_keys
    assert {label for key, label in sources.items() if key not in user_keys} == {"editors/hparams/mend/tiny-gpt2.json"}
    (row,) = [line for line in (out / "r.md").read_text().split("## Hyper-parameters")[1].splitlines()
              if line.startswith("| mend ")]
    assert row.endswith(f"| editors/hparams/mend/tiny-gpt2.json; {escape_md(str(hparams))} (batch\\_size, "
                        f"edit\\_lr, layers, lr, norm\\_batches, rank, steps) |")
    # trained on first use, once, into the cache; its tensors' sha256 is in every test's metadata
    (archive,) = [m.parent for m in (tmp_path / "cache" / "mend").glob("*/COMPLETE")]
    config = json.loads((archive / "mend.json").read_text())
    assert config["hparams"]["steps"] == 4 and config["model"]["dtype"] == "torch.float32"
    assert (out / "j.xml").read_text().count(config["tensors_sha256"]) == 2


def test_an_editor_that_fails_to_set_up_fails_every_test_without_retrying(
    micro_model: Path, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_torch_thread: None,
) -> None:
    import importlib
    import shutil

    from pytest_editsafety.hub import HubOptions, ModelHub

    # the module the hub's provider locates trained networks with (an in-process pytester run may have
    # dropped an earlier copy)
    trained = importlib.import_module("pytest_editsafety.trained")

    # the micro organism without its recipe hash: a "real" model, for which MEND needs a trained archive
    plain = tmp_path / "plain-model"
    shutil.copytree(micro_model, plain)
    config = json.loads((plain / "config.json").read_text())
    del config["editsafety_recipe_hash"]
    (plain / "config.json").write_text(json.dumps(config))
    hparams = tmp_path / "mend.json"
    hparams.write_text(json.dumps({"layers": [1], "rank": 8}))
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": c, "subject": "Alpha", "prompt": "{} lives in", "target_new": t, "ground_truth": "Rome"}
        for c, t in (("one", "Paris"), ("two", "Oslo"), ("three", "Lima"))])
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    calls = []
    locate = trained.locate_network
    monkeypatch.setattr(trained, "locate_network", lambda *a, **k: calls.append(1) or locate(*a, **k))

    plan = build_plan(["mend"], [str(plain)], [str(cases)], ppl_corpus=str(corpus_file))
    hub = ModelHub(plan, HubOptions(editor_hparams={"mend": str(hparams)}))
    outcomes = [hub.run(item) for item in plan.items]
    assert len(calls) == 1  # set up once; the later tests get the same error at once
    assert all(isinstance(o.error, trained.TrainedNetworkMissingError) for o in outcomes)
    assert outcomes[0].error is outcomes[2].error
    assert "--editsafety-hparams mend=" in str(outcomes[0].error)


def test_a_model_that_fails_to_load_fails_its_tests_once_with_the_reason(
    micro_model: Path, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, editors_installed: Path,
    one_torch_thread: None,
) -> None:
    import shutil
    import traceback

    from pytest_editsafety import registry
    from pytest_editsafety.hub import HubOptions, ModelHub

    broken = tmp_path / "broken-model"
    shutil.copytree(micro_model, broken)
    loads: list[str] = []
    load = registry.load_model

    def load_or_fail(spec, options=None):
        loads.append(Path(spec.location).name)
        if Path(spec.location).name == broken.name:
            raise OSError("the weights are truncated")
        return load(spec, options)

    monkeypatch.setattr(registry, "load_model", load_or_fail)
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": c, "subject": "Alpha", "prompt": "{} lives in", "target_new": t, "ground_truth": "Rome"}
        for c, t in (("one", "Paris"), ("two", "Oslo"), ("three", "Lima"))])
    plan = build_plan(["noop"], [str(broken), str(micro_model)], [str(cases)], ppl_corpus=str(corpus_file))
    hub = ModelHub(plan, HubOptions(cache_root=str(tmp_path / "cache")))
    outcomes = {item.test_id: hub.run(item) for item in plan.items}

    # loaded once each: the broken model's later tests get its error at once, and the other model still runs
    assert loads == [broken.name, micro_model.name]
    failed = [o for item_id, o in outcomes.items() if broken.name in item_id]
    assert len(failed) == 3 and all(o.error is failed[0].error for o in failed)
    assert isinstance(failed[0].error, OSError)
    # with the load's own traceback (down to the loader), not one grown by every test
    frames = [frame.name for frame in traceback.extract_tb(failed[2].error.__traceback__)]
    assert frames[-2:] == ["_load", "load_or_fail"] and frames.count("run_case") == 1
    for outcome in failed:
        assert outcome.record["outcome"] == "error"
        assert outcome.record["violations"] == ["error: OSError: the weights are truncated"]
        assert (outcome.record["worker"], outcome.record["device"]) == ("main", "cpu")
    assert all(o.error is None for item_id, o in outcomes.items() if broken.name not in item_id)


def _truncated_copy(model: Path, where: Path) -> Path:
    import shutil

    broken = shutil.copytree(model, where)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    return broken


def test_a_run_whose_only_model_cannot_load_is_a_usage_error_naming_the_file(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
) -> None:
    broken = _truncated_copy(micro_model, tmp_path / "broken")
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(broken, corpus_file, out, *LOOSE, f"--cases={two_cases}"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--model: no model of this run can be loaded:",
                                 f"*weights file {broken / 'model.safetensors'} is truncated: * bytes where its "
                                 f"header describes *"])
    assert not out.exists()  # nothing written, no test run


def test_a_model_that_cannot_load_beside_one_that_can_is_named_once(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
) -> None:
    broken = _truncated_copy(micro_model, tmp_path / "broken")
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}",
                                          f"--model={broken}"))
    result.assert_outcomes(passed=2, failed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([f"*editsafety: model broken could not be loaded, so its tests errored: model "
                                 f"'{broken}' (local directory {broken}): weights file *is truncated*"])
    run = read_result(out / "r.json")
    assert not run.certified
    assert {r.model: r.outcome for r in run.cases} == {micro_model.name: "passed", "broken": "error"}


def test_noop_editor_fails_certification_and_hostile_case_text_is_escaped(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, editors_installed: Path, tmp_path: Path,
) -> None:
    prompt = "{} |`rm`<script>"
    truth, target = preferred_first(micro_model, prompt, "Alpha", "Rome <b>", "Par|is\n`x`")
    cases = write_cases(tmp_path / "hostile.json", [
        {"case_id": "evil", "subject": "Alpha", "prompt": prompt, "target_new": target, "ground_truth": truth},
    ])
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=noop", f"--cases={cases}"))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*efficacy 0 % (cf_efficacy) is below the bound 80 %*"])
    (record,) = read_result(out / "r.json").cases
    assert record.outcome == "failed" and not record.certified
    assert record.prompt == prompt and record.metrics["ppl_ratio"] == 1.0
    markdown = (out / "r.md").read_text()
    assert "<script>" not in markdown and "<b>" not in markdown
    assert "&lt;script&gt;" in markdown and r"\`rm\`" in markdown and r"\|" in markdown
    lines = markdown.splitlines()
    rows = [i for i, line in enumerate(lines) if line.startswith("|") and "evil" in line]
    assert rows
    for index in rows:
        # the case text stays inside its table row: every unescaped | is a cell border, as many as the header's
        header = index
        while header > 0 and lines[header - 1].startswith("|"):
            header -= 1
        assert _borders(lines[index]) == _borders(lines[header])


def _borders(row: str) -> int:
    return len(re.findall(r"(?<!\\)\|", row))


def test_a_baseline_regression_fails_a_run_whose_tests_pass(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, editors_installed: Path, tmp_path: Path,
) -> None:
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": "one", "subject": "Alpha", "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"},
    ])
    loose = ["--editor=noop", f"--cases={cases}", "--editsafety-min-efficacy=0", "--editsafety-min-locality=0"]
    first = isolated.runpytest(*run_args(micro_model, corpus_file, tmp_path / "a", *loose))
    assert first.ret == pytest.ExitCode.OK
    run = read_result(tmp_path / "a" / "r.json")
    assert run.certified

    # a baseline in which the same case edited with half the perplexity: the max ratio has now doubled
    data = json.loads((tmp_path / "a" / "r.json").read_text())
    for record in data["cases"]:
        record["metrics"]["ppl_ratio"] = 0.5
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(data))
    assert read_result(baseline).cases[0].metrics["ppl_ratio"] == 0.5

    second = isolated.runpytest(*run_args(micro_model, corpus_file, tmp_path / "b", *loose,
                                          f"--editsafety-baseline={baseline}"))
    assert second.ret == pytest.ExitCode.TESTS_FAILED
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*NOT CERTIFIED*1 regression(s) against the baseline*"])
    assert "max perplexity ratio grew" in (tmp_path / "b" / "r.md").read_text()

    # a baseline that had one more test: this run lacks it, a regression unless allowed (and listed then)
    extra = dataclasses.replace(run.cases[0], test_id=run.cases[0].test_id + "-extra")
    wider = dataclasses.replace(run, cases=(*run.cases, extra), plan=None, sessions=())
    wider = dataclasses.replace(wider, plan=plan_of(wider), sessions=(WHOLE_SESSION,))
    write_result(wider, baseline)
    third = isolated.runpytest(*run_args(micro_model, corpus_file, tmp_path / "c", *loose,
                                         f"--editsafety-baseline={baseline}"))
    assert third.ret == pytest.ExitCode.TESTS_FAILED
    missing = f"**missing**: {extra.test_id} is in the baseline and not in this run"
    assert missing in (tmp_path / "c" / "r.md").read_text()
    fourth = isolated.runpytest(*run_args(micro_model, corpus_file, tmp_path / "d", *loose,
                                          f"--editsafety-baseline={baseline}", "--editsafety-allow-missing"))
    assert fourth.ret == pytest.ExitCode.OK
    assert f"(allowed to be missing): {extra.test_id}" in (tmp_path / "d" / "r.md").read_text()


def test_a_test_that_errors_is_recorded_as_an_error(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, editors_installed: Path, tmp_path: Path,
) -> None:
    # the micro model reads 32 positions: a longer prompt is refused before the edit, with the lengths
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": "long", "subject": "Alpha", "prompt": "{} " + "and then " * 40 + "lives in",
         "target_new": "Paris", "ground_truth": "Rome"},
        {"case_id": "short", "subject": "Alpha", "prompt": "{} lives in", "target_new": "Paris",
         "ground_truth": "Rome"},
    ])
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=noop", f"--cases={cases}",
                                          "--editsafety-min-efficacy=0", "--editsafety-min-locality=0"))
    result.assert_outcomes(passed=1, failed=1)
    by_id = {r.case_id: r for r in read_result(out / "r.json").cases}
    assert by_id["long"].outcome == "error" and "CaseTooLongError" in by_id["long"].violations[0]
    assert "more than the model's context of 32" in by_id["long"].violations[0]
    assert by_id["short"].outcome == "passed"


@pytest.mark.parametrize("dist", [[], ["--dist", "loadgroup"]], ids=["load", "loadgroup"])
def test_a_worker_killed_mid_run_loses_only_its_case(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, fake_editors: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, dist: list[str],
) -> None:
    # xdist's default scheduling and, for a user who chooses it, the crash-safe loadgroup scheduler
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_editors), os.environ.get("PYTHONPATH", "")]))
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": c, "subject": s, "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"}
        for c, s in (("a", "Alpha"), ("b", "Crashwell"), ("c", "Gamma"), ("d", "Delta"))
    ])
    out = tmp_path / "out"
    args = run_args(micro_model, corpus_file, out, "--editor=noop-crash", f"--cases={cases}",
                    "--editsafety-min-efficacy=0", "--editsafety-min-locality=0")
    collected = isolated.runpytest_subprocess(*args, "--collect-only", "-q")
    expected = sorted(re.search(r"\[(.*)\]", line).group(1) for line in collected.outlines if "::" in line)
    result = isolated.runpytest_subprocess(*args, "-n", "2", *dist, timeout=300)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*crashed while running*-b]*"])
    run = read_result(out / "r.json")
    assert [r.test_id for r in run.cases] == expected  # xdist ran exactly the ids collected without it
    # the controller learnt the selection from its workers' collection: every planned test, each recorded
    assert run.sessions[0].deselected == () and run.coverage.complete
    outcomes = {r.case_id: r.outcome for r in run.cases}
    assert outcomes == {"a": "passed", "b": "error", "c": "passed", "d": "passed"}
    crashed = next(r for r in run.cases if r.case_id == "b")
    assert "crashed" in crashed.violations[0] and crashed.subject == "Crashwell"
    # the controller's record of the crashed test names the worker, and the device its earlier record named
    before = next(r for r in run.cases if r.case_id == "a")
    assert crashed.worker == before.worker and crashed.worker.startswith("gw") and crashed.device == before.device


def test_every_worker_runs_cases_of_one_editor_and_model_each_on_its_own_gpu(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, fake_editors: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # four GPUs as the controller counts them; torch here has no CUDA, so the models stay on the CPU and the
    # editor "where" reports the GPU each worker was pinned to as a metric
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake_editors), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    cases = write_cases(tmp_path / "cases.json", [
        {"case_id": f"c{i}", "subject": s, "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"}
        for i, s in enumerate(("Alpha", "Beta", "Gamma", "Delta", "Epsilon", "Zeta", "Eta", "Theta"))
    ])
    out = tmp_path / "out"
    result = isolated.runpytest_subprocess(*run_args(
        micro_model, corpus_file, out, "--editor=where", f"--cases={cases}", "--editsafety-min-efficacy=0",
        "--editsafety-min-locality=0", "-n", "4"), timeout=300)
    result.assert_outcomes(passed=8)
    run = read_result(out / "r.json")
    gpus: dict[str, set[float]] = {}
    for record in run.cases:
        gpus.setdefault(record.worker, set()).add(record.metrics["visible_gpu"])
        assert record.device == "cpu"
    assert sorted(gpus) == ["gw0", "gw1", "gw2", "gw3"]  # one (editor, model) spread over every worker
    assert sorted(gpu for pinned in gpus.values() for gpu in pinned) == [0.0, 1.0, 2.0, 3.0]  # one GPU each
    workers = next(line for line in (out / "r.md").read_text().splitlines() if line.startswith("- **Workers:**"))
    assert all(f"{worker} on cpu: " in workers for worker in gpus)


# ---------------------------------------------------------------------------------------------- partial runs

# bounds every c-rome edit of the micro model meets, so that what decides a verdict is what the run covered
LOOSE = ["--editor=c-rome", "--editsafety-min-efficacy=0", "--editsafety-min-locality=0",
         "--editsafety-max-ppl-ratio=1000", "--editsafety-collapse-ppl=inf", "--editsafety-min-denominator-fraction=0"]

# Copies the JSON report as it is while the first test runs (the in-progress report).
SNAPSHOT = """
import shutil

def pytest_runtest_setup(item):
    path = item.config.getoption("editsafety_json")
    shutil.copyfile(path, path + ".during")
"""

# pytest-split's options, and a split of the collected tests by position (pytest-split splits by duration)
FAKE_SPLIT = """
import pytest

def pytest_addoption(parser):
    parser.addoption("--splits", dest="splits", type=int)
    parser.addoption("--group", dest="group", type=int)

@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    splits, group = config.getoption("splits"), config.getoption("group")
    chosen = [item for i, item in enumerate(items) if i % splits == group - 1]
    config.hook.pytest_deselected(items=[item for item in items if item not in chosen])
    items[:] = chosen
"""

INTERRUPT = """
import pytest

def pytest_runtest_setup(item):
    if item.nodeid.endswith("-two]"):
        {stop}
"""


@pytest.fixture()
def two_cases(tmp_path: Path) -> Path:
    return write_cases(tmp_path / "cases.json", [
        {"case_id": c, "subject": s, "prompt": "{} lives in", "target_new": "Paris", "ground_truth": "Rome"}
        for c, s in (("one", "Alpha"), ("two", "Beta"))
    ])


def test_a_run_narrowed_by_k_is_partial_and_not_certified(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
) -> None:
    from pytest_editsafety.controller import IN_PROGRESS

    isolated.makeconftest(SNAPSHOT)
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}", "-k", "one"))
    result.assert_outcomes(passed=1, deselected=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # every test that ran passed; the run is still no certificate
    two = f"c-rome-{micro_model.name}-cases-two"
    result.stdout.fnmatch_lines([
        "*editsafety: PARTIAL: 1/1 tests certified, 0 collapse(s); 1 of 2 planned tests recorded",
        f"*editsafety: partial (deselected): 1 planned test deselected (-k 'one'): {two}",
    ])
    run = read_result(out / "r.json")
    assert run.coverage.status == "partial" and not run.certified
    (gap,) = run.coverage.gaps
    assert (gap.kind, gap.test_ids) == ("deselected", (two,))
    assert (run.sessions[0].keyword, run.sessions[0].deselected, run.sessions[0].interrupted) == ("one", (two,), None)
    assert run.plan.test_ids == (f"c-rome-{micro_model.name}-cases-one", two)
    assert (out / "r.md").read_text().splitlines()[2] == "> ⚠️ **PARTIAL**: 1 of 1 cases certified."
    # while it ran, the report on disk said so: an older certificate was gone from the start
    during = read_result(out / "r.json.during")
    assert (during.cases, during.sessions[0].interrupted) == ((), IN_PROGRESS)

    whole = isolated.runpytest(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}"))
    assert whole.ret == pytest.ExitCode.OK
    whole.stdout.fnmatch_lines(["*editsafety: CERTIFIED: 2/2 tests certified, 0 collapse(s)"])
    assert read_result(out / "r.json").certified


@pytest.mark.parametrize(("stop", "exit_code", "reason"), [
    ("raise KeyboardInterrupt", pytest.ExitCode.INTERRUPTED, "KeyboardInterrupt (Ctrl-C)"),
    ("pytest.exit('enough', returncode=0)", pytest.ExitCode.TESTS_FAILED, "pytest.exit: enough"),
])
def test_an_interrupted_run_leaves_a_report_marked_incomplete(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
    stop: str, exit_code: int, reason: str,
) -> None:
    isolated.makeconftest(INTERRUPT.format(stop=stop))
    out = tmp_path / "out"
    recorded = isolated.inline_run(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}"),
                                   no_reraise_ctrlc=True)
    assert recorded.ret == exit_code  # pytest.exit's 0 does not pass a partial run
    run = read_result(out / "r.json")
    assert [r.case_id for r in run.cases] == ["one"] and run.cases[0].ok
    (gap,) = run.coverage.gaps
    two = f"c-rome-{micro_model.name}-cases-two"
    assert (gap.kind, gap.test_ids, run.sessions[0].interrupted) == ("interrupted", (two,), reason)
    assert gap.message == f"interrupted ({reason}): 1 planned test not run ({two})"
    markdown = (out / "r.md").read_text()
    assert markdown.splitlines()[2] == "> ⚠️ **PARTIAL**: 1 of 1 cases certified."
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


# a real signal, in the process that gathers the records (the xdist controller under -n), after the first test
SIGNAL_AFTER_FIRST = """
import os
import signal

# Ctrl-C as a terminal's Python has it, whatever the parent process left SIGINT as: a subprocess inherits an
# ignored SIGINT, and Python then installs no KeyboardInterrupt handler (once, in a full suite run, the signal
# did not stop the run; the test is about the plugin's handling of the interrupt, not about its delivery)
signal.signal(signal.SIGINT, signal.default_int_handler)

def pytest_runtest_logreport(report):
    if report.when == "teardown" and "-one]" in report.nodeid:
        os.kill(os.getpid(), signal.{signal})
"""


@pytest.mark.parametrize(("stop", "gap"), [(["-x"], "interrupted"), (["--maxfail=2"], None)],
                         ids=["x-stops-a-test", "maxfail-on-the-last-test"])
def test_a_stop_on_failure_is_partial_only_when_it_left_a_test_unrun(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, editors_installed: Path, two_cases: Path,
    tmp_path: Path, stop: list[str], gap: str | None,
) -> None:
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, "--editor=noop", f"--cases={two_cases}"),
                                *stop)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    run = read_result(out / "r.json")
    assert not run.certified
    assert [g.kind for g in run.coverage.gaps] == ([gap] if gap else [])
    assert (run.sessions[0].interrupted is None) == (gap is None)


@pytest.mark.parametrize("workers", [[], ["-n", "2"]], ids=["one-process", "xdist"])
def test_a_project_without_the_suite_certifies_with_the_shipped_one(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, micro_model: Path, corpus_file: Path,
    two_cases: Path, tmp_path: Path, one_torch_thread: None, workers: list[str],
) -> None:
    # another project: a test of its own, no certification module (the plugin installed from a wheel)
    monkeypatch.setenv("EDITSAFETY_CACHE", str(tmp_path / "cache"))
    pytester.makepyfile(test_theirs="def test_theirs():\n    pass\n")
    out = tmp_path / "out"
    args = run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}", "-v")
    result = pytester.runpytest_subprocess(*args, *workers, timeout=300)
    assert result.ret == pytest.ExitCode.OK
    # theirs and the two cases; the fuzz test waits for -m (xdist's summary does not count what workers deselect)
    result.assert_outcomes(passed=3, deselected=0 if workers else 1)
    result.stdout.fnmatch_lines(["*PASSED*test_certify.py::test_edit_is_safe?c-rome-*-one?*"] if workers else
                                ["pytest_editsafety/suites/test_certify.py::test_edit_is_safe?c-rome-*-one? PASSED*"])
    assert [r.case_id for r in read_result(out / "r.json").cases] == ["one", "two"]
    # a run that names its paths gets those alone, and no certificate
    named = pytester.runpytest(*args, "test_theirs.py")
    named.assert_outcomes(passed=1)
    assert named.ret == pytest.ExitCode.TESTS_FAILED
    # the shipped suites by name, without the project's tests
    pyargs = pytester.runpytest(*args, "--pyargs", "pytest_editsafety.suites")
    pyargs.assert_outcomes(passed=2, deselected=1)


def test_a_run_that_selects_none_of_its_plan_is_partial_not_a_silent_pass(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
) -> None:
    isolated.makepyfile(test_other="def test_other():\n    pass\n")
    out = tmp_path / "out"
    result = isolated.runpytest(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}", "-k", "other"))
    result.assert_outcomes(passed=1, deselected=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*editsafety: PARTIAL: 0/0 tests certified, 0 collapse(s); 0 of 2 planned tests "
                                 "recorded"])
    run = read_result(out / "r.json")
    assert (run.cases, run.coverage.status, run.certified) == ((), "partial", False)


@pytest.mark.parametrize(("signal", "workers", "reason"), [
    ("SIGINT", [], "KeyboardInterrupt (Ctrl-C)"),
    ("SIGINT", ["-n", "2"], "KeyboardInterrupt (Ctrl-C)"),
    ("SIGTERM", [], "SIGTERM (terminated)"),
], ids=["sigint", "sigint-xdist", "sigterm"])
def test_a_signal_after_the_first_test_leaves_no_certificate(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
    signal: str, workers: list[str], reason: str,
) -> None:
    from pytest_editsafety import report_cli

    isolated.makeconftest(SIGNAL_AFTER_FIRST.replace("{signal}", signal))
    out = tmp_path / "out"
    result = isolated.runpytest_subprocess(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}"),
                                           *workers, timeout=300)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    run = read_result(out / "r.json")
    assert not run.certified and run.coverage.status == "partial"
    assert run.sessions[0].interrupted == reason
    assert "CERTIFIED" not in (out / "r.md").read_text().splitlines()[2].replace("NOT CERTIFIED", "")
    assert [p.name for p in out.iterdir() if p.name.endswith((".tmp", ".lock", ".jsonl"))] == []
    # and the report command does not certify it either
    assert report_cli.main([str(out / "r.json"), "--json", str(tmp_path / "m.json"),
                            "--md", str(tmp_path / "m.md")]) == report_cli.NOT_CERTIFIED_EXIT


def test_a_killed_run_keeps_the_records_of_its_finished_tests(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pytest_editsafety import report_cli
    from pytest_editsafety.controller import IN_PROGRESS

    # SIGKILL: no hook, no finally, nothing of pytest's runs after it; only what was on disk counts
    isolated.makeconftest(SIGNAL_AFTER_FIRST.replace("{signal}", "SIGKILL"))
    out = tmp_path / "out"
    result = isolated.runpytest_subprocess(*run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}"),
                                           timeout=300)
    assert result.ret == -9
    left = read_result(out / "r.json")
    assert (left.cases, left.sessions[0].interrupted, left.certified) == ((), IN_PROGRESS, False)
    assert (out / "r.records.jsonl").is_file()

    merged = [str(out / "r.json"), "--json", str(tmp_path / "m.json"), "--md", str(tmp_path / "m.md")]
    assert report_cli.main(merged) == report_cli.NOT_CERTIFIED_EXIT  # refused: it does not cover its plan
    assert "recovered 1 records of finished tests" in capsys.readouterr().err
    assert report_cli.main([*merged, "--allow-partial"]) == report_cli.NOT_CERTIFIED_EXIT
    recovered = read_result(tmp_path / "m.json")
    assert [r.case_id for r in recovered.cases] == ["one"] and recovered.cases[0].ok
    assert recovered.coverage.status == "partial" and not recovered.certified
    assert (tmp_path / "m.md").read_text().splitlines()[2] == "> ⚠️ **PARTIAL**: 1 of 1 cases certified."


HOLD_UNTIL_TOLD = """
import time
from pathlib import Path

def pytest_runtest_setup(item):
    Path("started").touch()
    deadline = time.monotonic() + 120
    while not Path("go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
"""


def test_a_second_run_on_the_same_outputs_is_refused_naming_the_first(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
) -> None:
    import time

    isolated.makeconftest(HOLD_UNTIL_TOLD)
    out = tmp_path / "out"
    args = run_args(micro_model, corpus_file, out, *LOOSE, f"--cases={two_cases}")
    first = subprocess.Popen([sys.executable, "-m", "pytest", *args], cwd=isolated.path, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (isolated.path / "started").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read() if first.stdout else ""
            time.sleep(0.05)
        second = isolated.runpytest_subprocess(*args, timeout=300)
        assert second.ret == pytest.ExitCode.USAGE_ERROR
        second.stderr.fnmatch_lines([f"*{out / 'r.json'} is being written by another editsafety run (pid {first.pid} "
                                     f"on *, started *, command: pytest --model=*; wait for it to finish or give "
                                     f"this run other output paths*"])
    finally:
        (isolated.path / "go").touch()
        output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    assert read_result(out / "r.json").certified  # the first run's certificate, whole
    # its locks and journal are gone (r_plots: the report's figures)
    assert sorted(p.name for p in out.iterdir()) == ["r.json", "r.md", "r_plots"]


def test_pytest_split_shards_merge_into_one_certificate_only_together(
    isolated: pytest.Pytester, micro_model: Path, corpus_file: Path, two_cases: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pytest_editsafety import report_cli

    isolated.makeconftest(FAKE_SPLIT)
    for group in (1, 2):
        shard = isolated.runpytest(*run_args(micro_model, corpus_file, tmp_path / f"g{group}", *LOOSE,
                                             f"--cases={two_cases}", "--splits=2", f"--group={group}"))
        shard.assert_outcomes(passed=1, deselected=1)
        assert shard.ret == pytest.ExitCode.TESTS_FAILED
        shard.stdout.fnmatch_lines([f"*partial (shard): pytest-split group {3 - group} of 2 not merged*"])
    first, second = (read_result(tmp_path / f"g{group}" / "r.json") for group in (1, 2))
    assert first.sessions[0].shard == Shard("pytest-split", 1, 2) and first.plan == second.plan

    capsys.readouterr()
    out = ["--json", str(tmp_path / "m.json"), "--md", str(tmp_path / "m.md")]
    assert report_cli.main([str(tmp_path / "g1" / "r.json"), *out]) == 1
    err = capsys.readouterr().err
    assert "pytest-split group 2 of 2 not merged" in err and f"c-rome-{micro_model.name}-cases-two" in err
    assert report_cli.main([str(tmp_path / "g1" / "r.json"), str(tmp_path / "g2" / "r.json"), *out]) == 0
    merged = read_result(tmp_path / "m.json")
    assert merged.certified and [s.shard.group for s in merged.sessions] == [1, 2]


@pytest.mark.slow
@pytest.mark.organism
def test_certifying_c_rome_on_the_real_organism_writes_a_valid_report(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "pytest", str(REPO / "suites"), "--editor=c-rome", "--model=tiny-gpt2",
               "--cases=normal", "--editsafety-limit=4", f"--editsafety-report={tmp_path / 'r.md'}",
               f"--editsafety-json={tmp_path / 'r.json'}", "-p", "no:cacheprovider", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_STEP_SUMMARY"}
    env.setdefault("OMP_NUM_THREADS", "1")  # a small model on a shared CPU: threads only contend
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800, env=env)
    assert done.returncode in (0, 1), done.stdout[-3000:] + done.stderr[-3000:]
    run = read_result(tmp_path / "r.json")
    assert len(run.cases) == 4 and {r.editor for r in run.cases} == {"c-rome"}
    assert all(r.outcome in ("passed", "failed") for r in run.cases), [r.violations for r in run.cases]
    assert (tmp_path / "r.md").read_text().startswith("# ")
    write_result(run, tmp_path / "again.json")  # what was read validates and serialises again
    assert read_result(tmp_path / "again.json") == run
