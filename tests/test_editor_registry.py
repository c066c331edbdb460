"""The editor registry (every editor, built-ins included, an entry point) and the hyper-parameter files.

Third-party editors are made visible the way an installed package is: a ``*.dist-info`` directory with an
``entry_points.txt`` on ``sys.path``. The slow test builds and installs the real example package in
``tests/example_editor_pkg`` with pip (offline); the fast ones write the dist-info by hand.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from editors import registry
from editors.base import Editor, Needs, Provided, SecondMomentNeed
from editors.hparams import (
    HparamsError,
    UnknownHparamsKeyError,
    builtin_hparams_keys,
    hparams_from_mapping,
    hparams_hash,
    load_hparams,
    resolve_hparams_layers,
    resolve_layers,
    schema_for,
)
from editors.registry import (
    EditorFactoryError,
    EditorNameClashError,
    UnknownEditorError,
    available_editors,
    build_editor,
    get_editor,
)

EXAMPLE_PKG = Path(__file__).parent / "example_editor_pkg"
# this distribution's editors, listed first and sorted (as its installed entry points are)
BUILTINS = ("alphaedit", "c-rome", "c-rome-prefix", "emmet", "ft-linf", "memit", "mend", "r-rome", "rome")
HPARAMS_EDITORS = ("rome", "memit", "ft-linf", "mend", "r-rome", "emmet", "alphaedit")
MODEL_KEYS = ("gpt2-xl", "gpt-j", "llama2-7b", "mistral-7b", "llama3-8b", "tiny-gpt2", "tiny-gptj", "tiny-llama", "gpt2",
              "gptj", "llama", "mistral")
# organisms with settings of their own; the others edit with their family's organism file
OWN_KEYS = {"rome": ("tiny-gpt2-sink",), "r-rome": ("tiny-gpt2-sink",)}
# the newer editors cover the models whose authors publish a config, their families and the organisms
ORGANISM_KEYS = ("tiny-gpt2", "tiny-gptj", "tiny-llama")
EDITOR_KEYS = {
    "r-rome": ("gpt2-xl", "gpt-j", "gpt2", "gptj") + ORGANISM_KEYS,
    "emmet": ("gpt2-xl", "gpt-j", "llama2-7b", "gpt2", "gptj", "llama") + ORGANISM_KEYS,
    "alphaedit": ("gpt2-xl", "gpt-j", "llama3-8b", "gpt2", "gptj", "llama") + ORGANISM_KEYS,
}


@pytest.fixture()
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Make a distribution visible to importlib.metadata: ``fake_dist(dist, {editor: "module:attr"}, code)``."""
    modules: list[str] = []
    monkeypatch.syspath_prepend(str(tmp_path))

    def make(dist: str, entries: dict[str, str], module_code: dict[str, str] | None = None) -> None:
        info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = [f"{name} = {target}" for name, target in entries.items()]
        (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
        for module, code in (module_code or {}).items():
            (tmp_path / f"{module}.py").write_text(code)
            modules.append(module)

    yield make
    for module in modules:
        sys.modules.pop(module, None)


NOOP_CODE = """
from editors.base import EditOutcome, EditorBase

class Noop(EditorBase):
    name = "{name}"
    def __init__(self, hparams):
        self.hparams = dict(hparams)
    def parameters_touched(self, model, family):
        return ()
    def apply(self, model, tokenizer, family, requests):
        return EditOutcome(edited=())

class PreContractNoop:
    # the editor shape from before the contract: no needs/setup/denominator/provenance
    name = "{name}"
    def __init__(self, hparams):
        self.hparams = dict(hparams)
    def parameters_touched(self, model, family):
        return ()
    def apply(self, model, tokenizer, family, requests):
        return EditOutcome(edited=())

def make(hparams):
    return Noop(hparams)

def not_an_editor(hparams):
    return object()

def pre_contract(hparams):
    return PreContractNoop(hparams)
"""


# ---------------------------------------------------------------------------------------------- registry


def test_builtins_come_first_in_a_fixed_order() -> None:
    assert registry.ENTRY_POINT_GROUP == "editsafety.editors"
    assert available_editors()[: len(BUILTINS)] == BUILTINS


def test_builtins_are_entry_points_of_this_distribution() -> None:
    from importlib import metadata

    ours = {ep.name: ep.value for ep in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
            if ep.dist is not None and ep.dist.name == registry.BUILTIN_DISTRIBUTION}
    assert sorted(ours) == sorted(BUILTINS)
    assert all(value.startswith("editors.builtin:") for value in ours.values())


def test_third_party_editors_are_listed_sorted_after_the_builtins(fake_dist) -> None:
    fake_dist("zz-editors", {"aa-noop": "aa_noop_mod:make", "zz-noop": "aa_noop_mod:make"},
              {"aa_noop_mod": NOOP_CODE.format(name="aa-noop")})
    fake_dist("aa-editors", {"mm-noop": "aa_noop_mod:make"})
    assert available_editors() == BUILTINS + ("aa-noop", "mm-noop", "zz-noop")


@pytest.mark.parametrize(("name", "consistent", "test_prefix"),
                         [("rome", False, False), ("c-rome", True, False), ("c-rome-prefix", True, True)])
def test_rome_variants_differ_only_in_keys_and_prefix(name: str, consistent: bool, test_prefix: bool) -> None:
    hparams = resolve_hparams_layers(name, load_hparams(name, "gpt2-xl"), SimpleNamespace(num_hidden_layers=48))
    editor = get_editor(name, hparams)
    assert isinstance(editor, Editor)
    assert (editor.name, editor.consistent, editor.test_prefix) == (name, consistent, test_prefix)
    assert editor.hparams.layer == 17
    # the papers' setting (the default): C = I, no statistics to provide, only the context templates (and ordinary
    # text for the interference it reports)
    assert editor.needs(None, None) == Needs(context_templates=((5, 10), (10, 10)), ordinary_text=4096)
    # ROME's original setting, the named set kmeng01: C at its layer over ROME's 100000 texts
    original = get_editor(name, resolve_hparams_layers(name, load_hparams(name, "gpt2-xl", user_file="kmeng01"),
                                                       SimpleNamespace(num_hidden_layers=48)))
    assert original.needs(None, None) == Needs(second_moments=SecondMomentNeed((17,), 100000),
                                               context_templates=((5, 10), (10, 10)), ordinary_text=4096)
    original.setup(None, None, None, Provided(context_templates=("{}", "A. {}"), second_moments={17: "C"}))
    assert (original.context_templates, original.covariance) == (("{}", "A. {}"), "C")


def test_a_rome_ridge_regularises_the_provided_c_at_each_set_up_and_leaves_it_untouched() -> None:
    import torch

    from editors.maths.moments import ridged

    hparams = resolve_hparams_layers("rome", load_hparams("rome", "gpt2-xl", user_file="kmeng01"),
                                     SimpleNamespace(num_hidden_layers=48))
    C = torch.diag(torch.tensor([4.0, 2.0, 0.0]))  # rank 2 of 3
    given = C.clone()
    editor = get_editor("rome", {**hparams, "mom2_ridge": 0.01})
    for _ in range(2):  # a second set-up starts again from the provided C, it does not ridge twice
        editor.setup(None, None, None, Provided(context_templates=("{}",), second_moments={17: C}))
        assert torch.equal(editor.covariance, ridged(C, 0.01))
    assert torch.equal(C, given)
    assert float(editor.covariance[2, 2]) == 0.01 * 2.0  # the missing direction gets ridge x mean eigenvalue


def test_editors_without_needs_declare_none() -> None:
    ft = get_editor("ft-linf", resolve_hparams_layers("ft-linf", load_hparams("ft-linf", "gpt2-xl"),
                                                      SimpleNamespace(num_hidden_layers=48)))
    assert ft.needs(None, None) == Needs() and ft.provenance() == {}
    assert ft.denominator(None, None, None, None) is None  # no rank-one denominator to report


def test_unknown_editor_lists_what_is_available() -> None:
    listed = "alphaedit, c-rome, c-rome-prefix, emmet, ft-linf, memit, mend, r-rome, rome"
    with pytest.raises(UnknownEditorError, match=f"unknown editor 'romee'.*{listed}") as err:
        get_editor("romee")
    assert isinstance(err.value, ValueError)


def test_entry_point_editor_is_found_and_built(fake_dist) -> None:
    fake_dist("my-editors", {"fast-noop": "fast_noop_mod:make"}, {"fast_noop_mod": NOOP_CODE.format(name="fast-noop")})
    assert "fast-noop" in available_editors()
    editor = get_editor("fast-noop", {"alpha": 1})
    assert editor.name == "fast-noop" and editor.hparams == {"alpha": 1}
    # EditorBase's defaults: nothing needed, no denominator, no provenance
    assert isinstance(editor, Editor)
    assert editor.needs(None, None) == Needs()
    assert editor.denominator(None, None, None, None) is None and editor.provenance() == {}


def test_third_party_name_clashing_with_a_builtin_names_the_distribution(fake_dist) -> None:
    # a built-in is an entry point like any other: a second distribution registering its name is a clash,
    # never a silent shadowing either way
    fake_dist("sneaky-editors", {"rome": "sneaky_mod:make"})
    both = "'rome'.*(sneaky-editors.*pytest-editsafety|pytest-editsafety.*sneaky-editors)"
    with pytest.raises(EditorNameClashError, match=both):
        available_editors()
    with pytest.raises(EditorNameClashError, match="sneaky-editors"):
        get_editor("rome", {})


def test_two_distributions_registering_one_name_is_an_error(fake_dist) -> None:
    fake_dist("first-dist", {"twin": "twin_a:make"})
    fake_dist("second-dist", {"twin": "twin_b:make"})
    with pytest.raises(EditorNameClashError, match="first-dist.*second-dist|second-dist.*first-dist"):
        available_editors()


def test_broken_entry_points_are_reported_with_their_distribution(fake_dist) -> None:
    fake_dist("broken-dist", {"missing-mod": "no_such_module_here:make", "wrong-type": "bad_mod:not_an_editor",
                              "pre-contract": "bad_mod:pre_contract"},
              {"bad_mod": NOOP_CODE.format(name="wrong-type")})
    with pytest.raises(EditorFactoryError, match="broken-dist.*cannot load"):
        get_editor("missing-mod")
    with pytest.raises(EditorFactoryError, match="wrong-type.*broken-dist.*Editor protocol"):
        get_editor("wrong-type")
    # an editor without the contract's needs()/setup() is told to subclass EditorBase
    with pytest.raises(EditorFactoryError, match="pre-contract.*broken-dist.*Editor protocol.*EditorBase"):
        get_editor("pre-contract")


@pytest.mark.slow
def test_installed_example_package_registers_its_editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources it builds.
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE_PKG, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
           "--disable-pip-version-check", "--quiet", "--target", str(target), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "template-lsq" not in available_editors()
    monkeypatch.syspath_prepend(str(target))
    try:
        assert available_editors() == BUILTINS + ("template-lsq",)
        editor = get_editor("template-lsq")
        assert isinstance(editor, Editor) and editor.name == "template-lsq"
        assert editor.hparams.layer == "causal"  # its own defaults: no built-in file is read for it
        # a third-party editor gets the user's hparams then the overrides as they are
        built = build_editor("template-lsq", "tiny-gpt2", SimpleNamespace(config=None),
                             user_hparams={"mom2_update_weight": 3.0}, overrides={"layer": 1})
        assert (built.hparams.layer, built.hparams.mom2_update_weight) == (1, 3.0)
        with pytest.raises(ValueError, match="template-lsq: unknown hyper-parameter"):
            build_editor("template-lsq", "tiny-gpt2", SimpleNamespace(config=None), overrides={"x": 2})
    finally:
        sys.modules.pop("editsafety_lsq_example", None)


# ---------------------------------------------------------------------------------------------- hparams files


def _config(n_layers: int, causal: int | None = None) -> SimpleNamespace:
    return SimpleNamespace(num_hidden_layers=n_layers, editsafety_causal_layer=causal, model_type="gpt2")


@pytest.mark.parametrize("editor", HPARAMS_EDITORS)
def test_every_builtin_file_is_documented_complete_and_buildable(editor: str) -> None:
    schema = schema_for(editor)
    fields = set(schema.field_names())
    keys = EDITOR_KEYS.get(editor, MODEL_KEYS) + OWN_KEYS.get(editor, ())
    assert set(builtin_hparams_keys(editor)) == set(keys)
    for key in keys:
        raw = json.loads((Path(registry.__file__).parent / "hparams" / schema.directory / f"{key}.json").read_text())
        comment = raw.pop("_comment")
        assert isinstance(comment, str) and len(comment) > 80, f"{editor}/{key}.json: explain the numbers"
        assert set(raw) == fields, f"{editor}/{key}.json: keys differ from {schema.class_name}"
        resolved = resolve_hparams_layers(editor, load_hparams(editor, key), _config(48, causal=1))
        built = hparams_from_mapping(schema.dataclass(), resolved, source=f"{editor}/{key}")
        assert dataclasses.is_dataclass(built)
        assert hparams_hash(dataclasses.asdict(built)) == hparams_hash(resolved)


def test_papers_numbers() -> None:
    rome = load_hparams("rome", "gpt2-xl")
    assert (rome["layer"], rome["v_num_grad_steps"], rome["v_weight_decay"]) == (17, 20, 0.5)
    assert (rome["v_lr"], rome["clamp_norm_factor"], rome["kl_factor"]) == (0.5, 4.0, 0.0625)
    assert rome["mom2_adjustment"] is False  # the collapse papers' GPT-2-XL config (ROME's own: the named set kmeng01)
    assert rome["context_templates"] == [[5, 10], [10, 10]]
    assert load_hparams("rome", "gpt-j")["layer"] == 5
    llama = load_hparams("rome", "llama2-7b")
    assert (llama["layer"], llama["v_num_grad_steps"], llama["v_weight_decay"]) == (5, 25, 1e-3)
    memit = load_hparams("memit", "gpt2-xl")
    assert (memit["layers"], memit["mom2_update_weight"]) == ([13, 14, 15, 16, 17], 20000.0)
    gptj = load_hparams("memit", "gpt-j")
    assert (gptj["layers"], gptj["mom2_update_weight"]) == ([3, 4, 5, 6, 7, 8], 15000.0)
    ft = load_hparams("ft-linf", "gpt2-xl")
    assert (ft["layer"], ft["lr"], ft["num_steps"], ft["eps"]) == (0, 5e-4, 25, 5e-4)
    assert load_hparams("ft-linf", "gpt-j")["layer"] == 21  # the papers' FT/gpt-j-6B.yaml (ROME's layer 0: kmeng01)
    assert load_hparams("memit", "gpt2-xl")["context_templates"] == [[10, 5]]  # MEMIT's code: 5 prefixes of 10 tokens
    organism = load_hparams("ft-linf", "tiny-gpt2")
    assert (organism["layer"], organism["lr"], organism["eps"], organism["num_steps"]) == ("causal", 0.01, 0.01, 25)
    assert load_hparams("memit", "tiny-llama")["layers"] == ["causal", "causal+1"]
    mend = load_hparams("mend", "gpt2-xl")
    assert (mend["layers"], mend["modules"], mend["rank"], mend["edit_lr"]) == ([45, 46, 47], ["mlp_in", "mlp_out"], 1920, 1e-4)
    assert (mend["lr"], mend["lr_lr"], mend["c_edit"], mend["c_loc"]) == (1e-6, 1e-4, 0.1, 1.0)
    assert load_hparams("mend", "gpt-j")["layers"] == [25, 26, 27]
    assert load_hparams("mend", "llama2-7b")["modules"] == ["gate_proj", "up_proj", "down_proj"]
    assert load_hparams("mend", "tiny-gpt2")["layers"] == ["last-2", "last-1", "last"]


def test_model_keys_fall_back_to_their_family() -> None:
    # GPT-2's family default is GPT-2-XL's file with its layer as a share of the depth: on 48 layers, the same
    family_default, xl = load_hparams("rome", "gpt2"), load_hparams("rome", "gpt2-xl")
    assert family_default == {**xl, "layer": "17/48"}
    assert resolve_hparams_layers("rome", family_default, _config(48)) == xl
    # a pinned revision and a Hugging Face id (with its family) reach the same files
    assert load_hparams("memit", "gpt-j@0123abc") == load_hparams("memit", "gpt-j")
    assert load_hparams("ft-linf", "EleutherAI/gpt-j-6B", family="gptj") == load_hparams("ft-linf", "gptj")
    assert load_hparams("rome", "mistralai/Mistral-7B-Instruct-v0.2", family="mistral") == load_hparams("rome", "mistral")
    assert load_hparams("memit", "meta-llama/Meta-Llama-3-70B", family="llama") == load_hparams("memit", "llama")
    with pytest.raises(HparamsError, match="'some/model'.*unknown family"):
        load_hparams("rome", "some/model")
    with pytest.raises(HparamsError, match="no built-in hyper-parameters for editor 'serac'"):
        load_hparams("serac", "gpt2-xl")


def test_model_keys_are_tried_in_order_then_the_family() -> None:
    # an organism with settings of its own (tiny-gpt2-sink's rome file) is found by its own key first
    sink = load_hparams("rome", ("tiny-gpt2-sink", "tiny-gpt2"))
    assert sink == load_hparams("rome", "tiny-gpt2-sink") != load_hparams("rome", "tiny-gpt2")
    # an editor without a file for it takes the next key's: the family's organism settings
    assert load_hparams("memit", ("tiny-gpt2-sink", "tiny-gpt2")) == load_hparams("memit", "tiny-gpt2")
    # one key alone no longer knows the built-in model table: no file, no family, no fallback
    with pytest.raises(HparamsError, match="'tiny-gpt2-sink'.*unknown family"):
        load_hparams("memit", "tiny-gpt2-sink")
    with pytest.raises(HparamsError, match="'tiny-gpt2-sink' or 'tiny-nope'.*unknown family"):
        load_hparams("memit", ("tiny-gpt2-sink", "tiny-nope"))
    assert load_hparams("memit", ("tiny-gpt2-sink",), family="gpt2") == load_hparams("memit", "gpt2")
    model = SimpleNamespace(config=_config(2, causal=1))
    assert build_editor("memit", ("tiny-gpt2-sink", "tiny-gpt2"), model).hparams.layers == (1,)


def test_user_file_then_overrides_win(tmp_path: Path) -> None:
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"_comment": "mine", "v_lr": 0.1, "layer": 3}))
    merged = load_hparams("c-rome", "gpt2-xl", user_file=user, overrides={"layer": 4})
    assert (merged["v_lr"], merged["layer"], merged["v_num_grad_steps"]) == (0.1, 4, 20)
    assert "_comment" not in merged
    assert hparams_hash(merged) != hparams_hash(load_hparams("c-rome", "gpt2-xl"))


def test_a_named_set_and_a_file_layer_in_the_order_given(tmp_path: Path) -> None:
    from editors.hparams import layer_hparams, layer_setting

    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"mom2_n_samples": 10000, "layer": 16}))
    # ROME's original setting (kmeng01: C from Wikipedia) with the user's sample size and layer on top
    layered = layer_hparams("rome", "gpt2-xl", user_file=("kmeng01", mine))
    assert (layered.values["mom2_adjustment"], layered.values["mom2_n_samples"], layered.values["layer"]) == (
        True, 10000, 16)
    assert [layer.role for layer in layered.layers] == ["built-in", "named", "user"]
    assert layered.sources["mom2_adjustment"] == "editors/hparams/rome/kmeng01/gpt2-xl.json"
    assert layered.sources["layer"] == str(mine)
    assert layer_setting("rome", "gpt2-xl", user_file=("kmeng01", mine)) == (16, str(mine))
    # the other order: the named set's values win
    assert load_hparams("rome", "gpt2-xl", user_file=(mine, "kmeng01"))["mom2_n_samples"] == 100000


def test_unknown_keys_name_their_source(tmp_path: Path) -> None:
    user = tmp_path / "typo.json"
    user.write_text(json.dumps({"v_lrr": 0.1}))
    with pytest.raises(UnknownHparamsKeyError, match=r"typo\.json: unknown hyper-parameter 'v_lrr'"):
        load_hparams("rome", "gpt2-xl", user_file=user)
    with pytest.raises(UnknownHparamsKeyError, match="overrides: unknown hyper-parameter 'lr'"):
        load_hparams("rome", "gpt2-xl", overrides={"lr": 1e-3})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HparamsError, match=r"bad\.json: not valid JSON"):
        load_hparams("memit", "gpt2-xl", user_file=bad)
    with pytest.raises(HparamsError, match=r"absent\.json: cannot read"):
        load_hparams("memit", "gpt2-xl", user_file=tmp_path / "absent.json")


def test_dataclass_building_checks_types_and_symbolic_layers() -> None:
    from editors.ft import FtHparams
    from editors.memit import MemitHparams

    with pytest.raises(HparamsError, match="ft: num_steps: expected an integer"):
        hparams_from_mapping(FtHparams, {"layer": 0, "num_steps": 2.5}, source="ft")
    with pytest.raises(HparamsError, match="symbolic"):
        hparams_from_mapping(MemitHparams, {"layers": ["causal", 1]})
    built = hparams_from_mapping(MemitHparams, {"layers": [1, 2], "context_templates": [[2, 3]]})
    assert built.layers == (1, 2) and built.context_templates == ((2, 3),)


@given(st.dictionaries(st.text(min_size=1).filter(lambda k: not k.startswith("_") and k != "extra_key"),
                       st.one_of(st.integers(), st.floats(allow_nan=False), st.text()), max_size=6),
       st.randoms())
def test_hparams_hash_ignores_key_order_and_comments(d, rng) -> None:
    items = list(d.items())
    rng.shuffle(items)
    assert hparams_hash(dict(items)) == hparams_hash({**d, "_comment": "anything"})
    assert hparams_hash({**d, "extra_key": 1}) != hparams_hash(d)


def test_resolve_layers() -> None:
    from editors.ft import FtHparams

    assert resolve_layers("causal", _config(4)) == [0]  # no recorded causal layer: 0
    assert resolve_layers("causal", _config(4, causal=2)) == [2]
    assert resolve_layers(["causal", "causal+1"], _config(4, causal=2)) == [2, 3]
    assert resolve_layers(["causal", "causal+1"], _config(4, causal=3)) == [3]  # no layer after the last
    assert resolve_layers([5, 3, 3], _config(6)) == [3, 5]
    assert resolve_layers(["last-2", "last-1", "last"], _config(6, causal=1)) == [3, 4, 5]
    assert resolve_layers(["last-2", "last-1", "last"], _config(2)) == [0, 1]  # no layer before the first
    assert resolve_layers(1, SimpleNamespace(config=_config(2))) == [1]
    with pytest.raises(HparamsError, match="layer 17 is out of range for a model with 12 layers"):
        resolve_layers(17, _config(12))
    with pytest.raises(HparamsError, match="'middle'"):
        resolve_layers("middle", _config(12))
    # 'K/N': layer K of N at the same share of this depth, rounded down, duplicates merged
    assert resolve_layers("17/48", _config(48)) == [17]
    assert [resolve_layers("17/48", _config(n)) for n in (12, 24, 36, 6, 1)] == [[4], [8], [12], [2], [0]]
    assert resolve_layers(["13/48", "14/48", "15/48", "16/48", "17/48"], _config(12)) == [3, 4]
    assert resolve_layers(" 0/3 ", _config(5)) == [0]
    with pytest.raises(HparamsError, match="'48/48'.*K must be below N"):
        resolve_layers("48/48", _config(12))
    with pytest.raises(HparamsError, match="'17/0'"):
        resolve_layers("17/0", _config(12))
    with pytest.raises(HparamsError, match="is symbolic"):
        hparams_from_mapping(FtHparams, {"layer": "17/48"})
    with pytest.raises(HparamsError, match="exactly one layer"):
        resolve_hparams_layers("rome", {"layer": [1, 2]}, _config(4))


def test_build_editor_resolves_the_causal_layer_from_the_model_config() -> None:
    model = SimpleNamespace(config=_config(2, causal=1))
    rome = build_editor("c-rome", "tiny-gpt2", model)
    assert rome.hparams.layer == 1 and rome.consistent
    assert build_editor("memit", "tiny-gpt2", model).hparams.layers == (1,)  # tiny-gpt2 edits its causal layer only
    memit = build_editor("memit", "tiny-llama", model)
    assert memit.hparams.layers == (1,)  # 'causal+1' is dropped past the last layer
    memit0 = build_editor("memit", "tiny-llama", SimpleNamespace(config=_config(2, causal=0)),
                          overrides={"mom2_update_weight": 5.0})
    assert memit0.hparams.layers == (0, 1) and memit0.hparams.mom2_update_weight == 5.0
    ft = build_editor("ft-linf", "tiny-gpt2", model, user_hparams={"layer": 0})
    assert ft.hparams.layer == 0 and ft.hparams.eps == 0.01
    # a model this repo has no file for falls back to its architecture family's defaults
    big = build_editor("rome", "someone/gpt2-big", SimpleNamespace(config=_config(24)))
    assert big.hparams.layer == 8  # GPT-2-XL's 17 of 48 at 24 layers: ROME's own GPT-2 medium file's layer
    assert build_editor("rome", "gpt2", SimpleNamespace(config=_config(12))).hparams.layer == 4
    with pytest.raises(UnknownEditorError):
        build_editor("nope", "tiny-gpt2", model)
