"""Corpora: ME-PPL parsing errors, the pinned built-in files, the cache, offline mode and the registry."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import sys
import urllib.error
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_editsafety import corpora
from pytest_editsafety.corpora import (
    ME_PPL_FILES,
    Corpus,
    CorpusFormatError,
    CorpusIntegrityError,
    CorpusUnavailableError,
    PinnedFile,
    load_me_ppl,
    parse_me_ppl,
    register_corpus,
    resolve_corpus,
)

SHARED_ME_PPL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ME-PPL"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never reach the network: any unplanned download attempt fails the test loudly."""

    def refuse(url, timeout):
        raise AssertionError(f"unexpected network access to {url}")

    monkeypatch.setattr(corpora, "_open_url", refuse)
    monkeypatch.setattr(corpora.urllib.request, "urlopen", lambda *a, **k: refuse(a[0] if a else "?", None))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("EDITSAFETY_CACHE", str(root))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("EDITSAFETY_OFFLINE", raising=False)
    return root


@pytest.fixture
def registry(monkeypatch) -> dict:
    """A private copy of the loader registry, so registrations do not outlive the test."""
    fresh = dict(corpora.CORPUS_LOADERS)
    monkeypatch.setattr(corpora, "CORPUS_LOADERS", fresh)
    return fresh


def shared_file(filename: str) -> Path:
    path = SHARED_ME_PPL / filename
    if not path.is_file():
        pytest.skip(f"{path} not present (shared/ is not beside the repository)")
    return path


# ---- the format -----------------------------------------------------------------------------------

MALFORMED = {
    "invalid-json": (b'[\n  {"Corpus": "C4", "Text": "fine"},\n  {"Text": "x",}\n]', ["line 3", "column"]),
    "object-not-list": (b'{"Corpus": "C4", "Text": "a sentence"}', ["expected a JSON list", "object"]),
    "string-not-list": (b'"just a sentence"', ["expected a JSON list", "string"]),
    "empty-list": (b"[]", ["empty"]),
    "entry-not-object": (b'[{"Text": "fine"}, "a bare string"]', ["entry 1", '"Text"', "string"]),
    "entry-null": (b'[{"Text": "a"}, {"Text": "b"}, null]', ["entry 2", "null"]),
    "missing-text": (
        b'[{"Text": "a"}, {"Text": "b"}, {"Corpus": "C4", "text": "c"}]',
        ["entry 2", 'missing field "Text"'],
    ),
    "text-number": (b'[{"Text": 42}]', ["entry 0", '"Text"', "must be a string", "number"]),
    "text-null": (b'[{"Text": "ok"}, {"Text": null}]', ["entry 1", '"Text"', "null"]),
    "text-list": (b'[{"Text": ["a", "b"]}]', ["entry 0", '"Text"', "list"]),
    "text-empty": (b'[{"Text": "ok"}, {"Text": ""}]', ["entry 1", '"Text" is empty']),
    "text-blank": (b'[{"Text": "ok"}, {"Text": "ok"}, {"Text": "  \\n "}]', ["entry 2", '"Text" is empty']),
    "corpus-not-string": (b'[{"Corpus": 3, "Text": "ok"}]', ["entry 0", '"Corpus"', "must be a string"]),
    "not-utf8": (b'[{"Text": "caf\xe9"}]', ["UTF-8"]),
    "truncated": (b'[{"Text": "a"}, {"Te', ["invalid JSON", "line 1"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_files_name_file_entry_and_field(tmp_path, case):
    content, fragments = MALFORMED[case]
    path = tmp_path / f"bad-{case}.json"
    path.write_bytes(content)
    with pytest.raises(CorpusFormatError) as info:
        load_me_ppl(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError)


def test_malformed_file_through_resolve(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"Corpus": "C4"}]')
    with pytest.raises(CorpusFormatError, match=r"broken\.json: entry 0: missing field"):
        resolve_corpus(str(path))


def test_valid_file_round_trips(tmp_path):
    entries = [
        {"Corpus": "Wikipedia", "Text": " The river runs north"},
        {"Corpus": "C4", "Text": " caf\u00e9 \u2019quoted\u2019 text", "extra": 1},
        {"Text": " no source given"},
    ]
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(entries, indent=2))
    corpus = load_me_ppl(path)
    assert corpus.name == "mine"
    assert corpus.texts == tuple(e["Text"] for e in entries)
    assert corpus.sources == ("Wikipedia", "C4", "")
    assert corpus.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(corpus) == 3
    assert resolve_corpus(path) == corpus


def test_missing_file_and_directory_are_unavailable(tmp_path):
    with pytest.raises(CorpusUnavailableError, match="does not exist"):
        load_me_ppl(tmp_path / "nope.json")
    with pytest.raises(CorpusUnavailableError, match="is a directory"):
        resolve_corpus(tmp_path)


json_texts = st.text(min_size=1, max_size=40).filter(lambda s: s.strip())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(json_texts, st.text(max_size=10)), min_size=1, max_size=20))
def test_parse_round_trips_any_valid_list(rows):
    data = json.dumps([{"Corpus": src, "Text": text} for text, src in rows]).encode()
    corpus = parse_me_ppl(data, origin="mem", name="prop")
    assert corpus.texts == tuple(t for t, _ in rows)
    assert corpus.sources == tuple(s for _, s in rows)
    assert corpus.sha256 == hashlib.sha256(data).hexdigest()


def test_from_texts_hash_is_unambiguous_and_stable():
    a = Corpus.from_texts("x", ["a\nb"])
    b = Corpus.from_texts("x", ["a", "b"])
    assert a.sha256 != b.sha256
    assert Corpus.from_texts("x", ["a", "b"]).sha256 == b.sha256
    assert b.sources == ("x", "x")
    with pytest.raises(ValueError, match="2 texts but 1 sources"):
        Corpus(name="x", texts=("a", "b"), sources=("s",), sha256="0")


# ---- built-in names, the cache and offline mode --------------------------------------------------


def test_real_files_match_their_pins():
    for pinned in ME_PPL_FILES.values():
        data = shared_file(pinned.filename).read_bytes()
        assert hashlib.sha256(data).hexdigest() == pinned.sha256, pinned.filename


def test_pinned_urls_point_at_the_commit():
    for pinned in ME_PPL_FILES.values():
        assert pinned.url == (
            "https://raw.githubusercontent.com/WanliYoung/Collapse-in-Model-Editing/"
            f"678beddf656385b660281de93a6650bb1b485ee9/data/ME-PPL/{pinned.filename}"
        )
    assert {p.filename for p in ME_PPL_FILES.values()} == {"ME-PPL_50.json", "ME-PPL_1k.json", "ME-PPL.json"}


@pytest.mark.parametrize("name, size", [("me-ppl-50", 50), ("me-ppl-1k", 1000)])
def test_builtin_name_loads_from_cache(cache, monkeypatch, name, size):
    pinned = ME_PPL_FILES[name]
    source = shared_file(pinned.filename)
    (cache / "corpora").mkdir(parents=True)
    shutil.copy(source, cache / "corpora" / pinned.filename)
    monkeypatch.setenv("EDITSAFETY_OFFLINE", "1")  # a cached file needs no network
    corpus = resolve_corpus(name.upper())
    assert corpus.name == name
    assert len(corpus) == size
    assert corpus.sha256 == pinned.sha256
    assert all(isinstance(t, str) and t.strip() for t in corpus.texts)
    assert "Wikipedia" in corpus.sources
    assert corpus == load_me_ppl(source, name=name)


def test_explicit_cache_dir_overrides_the_cache_root(cache, tmp_path):
    pinned = ME_PPL_FILES["me-ppl-50"]
    other = tmp_path / "elsewhere"
    (other / "corpora").mkdir(parents=True)
    shutil.copy(shared_file(pinned.filename), other / "corpora" / pinned.filename)
    assert len(resolve_corpus("me-ppl-50", cache_dir=other, offline=True)) == 50
    with pytest.raises(CorpusUnavailableError):
        resolve_corpus("me-ppl-50", offline=True)  # the default root holds nothing


def test_tampered_cached_file_is_rejected(cache):
    pinned = ME_PPL_FILES["me-ppl-50"]
    target = cache / "corpora" / pinned.filename
    target.parent.mkdir(parents=True)
    data = bytearray(shared_file(pinned.filename).read_bytes())
    data[100] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(CorpusIntegrityError) as info:
        resolve_corpus("me-ppl-50", offline=True)
    message = str(info.value)
    assert pinned.sha256 in message
    assert hashlib.sha256(bytes(data)).hexdigest() in message
    assert str(target) in message


def test_corrupted_cache_rejected_without_shared_data(cache):
    # the same guarantee, independent of shared/: any bytes but the pinned ones fail
    target = cache / "corpora" / "ME-PPL_1k.json"
    target.parent.mkdir(parents=True)
    target.write_text('[{"Corpus": "C4", "Text": " a perfectly valid sentence"}]')
    with pytest.raises(CorpusIntegrityError, match="expected " + ME_PPL_FILES["me-ppl-1k"].sha256):
        resolve_corpus("me-ppl-1k", offline=True)


@pytest.mark.parametrize("env", ["EDITSAFETY_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_without_cache_explains_how_to_provide(cache, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    with pytest.raises(CorpusUnavailableError) as info:
        resolve_corpus("me-ppl-50")
    message = str(info.value)
    assert "'me-ppl-50'" in message
    assert "--editsafety-ppl-corpus /path/to/ME-PPL_50.json" in message
    assert str(cache / "corpora" / "ME-PPL_50.json") in message
    assert env in message
    assert not (cache / "corpora" / "ME-PPL_50.json").exists()


class _FakeResponse(io.BytesIO):
    pass


def _fake_server(payload: bytes, calls: list[str]):
    def open_url(url, timeout):
        calls.append(url)
        assert timeout > 0
        return _FakeResponse(payload)

    return open_url


def test_download_verified_and_moved_into_place(cache, monkeypatch):
    payload = json.dumps([{"Corpus": "C4", "Text": f" sentence number {i}"} for i in range(5)]).encode()
    monkeypatch.setitem(ME_PPL_FILES, "me-ppl-50", PinnedFile("ME-PPL_50.json", hashlib.sha256(payload).hexdigest()))
    calls: list[str] = []
    monkeypatch.setattr(corpora, "_open_url", _fake_server(payload, calls))
    corpus = corpora.load_builtin_me_ppl("me-ppl-50", offline=False)
    assert calls == [ME_PPL_FILES["me-ppl-50"].url]
    assert len(corpus) == 5
    target = cache / "corpora" / "ME-PPL_50.json"
    assert target.read_bytes() == payload
    assert not list(target.parent.glob("*.part"))
    # the second load comes from the cache, not the network
    assert corpora.load_builtin_me_ppl("me-ppl-50", offline=False) == corpus
    assert len(calls) == 1


def test_download_with_wrong_hash_caches_nothing(cache, monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(corpora, "_open_url", _fake_server(b'[{"Text": "an impostor"}]', calls))
    with pytest.raises(CorpusIntegrityError) as info:
        resolve_corpus("me-ppl-1k", offline=False)
    message = str(info.value)
    assert ME_PPL_FILES["me-ppl-1k"].sha256 in message
    assert hashlib.sha256(b'[{"Text": "an impostor"}]').hexdigest() in message
    folder = cache / "corpora"
    assert not (folder / "ME-PPL_1k.json").exists()
    assert not list(folder.glob("*.part"))


@pytest.mark.parametrize(
    "error", [urllib.error.URLError("no route to host"), TimeoutError("timed out"), ConnectionResetError()]
)
def test_network_error_is_unavailable_with_how_to(cache, monkeypatch, error):
    def failing(url, timeout):
        raise error

    monkeypatch.setattr(corpora, "_open_url", failing)
    with pytest.raises(CorpusUnavailableError) as info:
        resolve_corpus("me-ppl-10k", offline=False)
    message = str(info.value)
    assert "'me-ppl-10k'" in message and "--editsafety-ppl-corpus" in message
    assert str(cache / "corpora" / "ME-PPL.json") in message
    assert not list((cache / "corpora").glob("ME-PPL.json*.part"))


# ---- names and the registry -----------------------------------------------------------------------


def test_unknown_name_lists_known_names(cache):
    with pytest.raises(CorpusUnavailableError) as info:
        resolve_corpus("no-such-corpus")
    message = str(info.value)
    assert "no-such-corpus" in message and "wikitext-103" in message
    for name in ("me-ppl-50", "me-ppl-1k", "me-ppl-10k", "organism-ppl", "organism-heldout", "organism-wiki"):
        assert name in message


def test_path_wins_over_a_name(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    Path("me-ppl-50").write_text('[{"Text": " local file"}]')
    assert resolve_corpus("me-ppl-50", offline=True).texts == (" local file",)


def test_organism_corpora_are_built_in_and_generated_not_downloaded(registry, cache, monkeypatch):
    monkeypatch.setenv("EDITSAFETY_OFFLINE", "1")
    heldout = resolve_corpus("organism-heldout")
    assert len(heldout.texts) == 400
    assert resolve_corpus("organism-heldout").sha256 == heldout.sha256  # generated deterministically
    ppl = resolve_corpus("organism-ppl")
    assert ppl.texts == resolve_corpus("organism").texts and ppl.sha256 == resolve_corpus("organism-ppl").sha256
    wiki = resolve_corpus("organism-wiki")
    assert wiki.sha256 == resolve_corpus("organism-wiki").sha256
    for name in ("organism", "organism-ppl", "organism-heldout", "organism-wiki"):
        with pytest.raises(ValueError, match="already registered"):
            register_corpus(name, lambda **_: heldout)


def test_organism_ppl_mixes_the_worlds_text_as_training_did_and_shares_nothing_with_c_or_training(registry, cache):
    from pytest_editsafety.zoo.recipe import TrainSpec
    from pytest_editsafety.zoo.world import LEAD_INS, World, WorldSpec

    ppl = resolve_corpus("organism-ppl")
    world = World(WorldSpec())
    training, heldout = world.filler_sentences()
    generic = [t for t, s in zip(ppl.texts, ppl.sources) if s == "organism-generic"]
    facts = [t for t, s in zip(ppl.texts, ppl.sources) if s == "organism-facts"]
    assert len(set(ppl.texts)) == len(ppl.texts) == 500
    assert len(facts) / len(ppl.texts) == pytest.approx(TrainSpec().fact_share)
    # generic sentences: never trained on, and not in organism-heldout, the organisms' sample for C
    assert generic and not set(generic) & (set(training) | set(heldout))
    subjects = set(world.subjects)
    assert all(any(s in text for s in subjects) for text in facts)
    # the rest open with their subject, as in training: the first-position keys ROME's hard cases stress
    behind_lead_in = sum(text.startswith(LEAD_INS) for text in facts) / len(facts)
    assert behind_lead_in == pytest.approx(TrainSpec().lead_in_share, abs=0.06)
    assert all(text.startswith(LEAD_INS) or any(text.startswith(s + " ") for s in subjects) for text in facts)
    # no sentence states a fact the built-in cases rewrite (its rising perplexity would be the edit working)
    from pytest_editsafety.zoo.cases import organism_cases

    edited = {(c.subject, c.ground_truth) for c in organism_cases("hard").cases}
    assert not [t for t in facts for subject, obj in edited if subject in t.split() and t.endswith(f" {obj}.")]


def test_organism_wiki_names_the_worlds_subjects_among_generic_text_and_shares_no_sentence_with_ppl(registry, cache):
    """C's text plays Wikipedia's part: generic text in which the world's subjects, the edited ones too, are named
    now and then, in the training's wording; never a sentence of the perplexity corpus it is scored against."""
    from pytest_editsafety.zoo.corpus import WIKI_SENTENCES_PER_SUBJECT as PER_SUBJECT
    from pytest_editsafety.zoo.world import LEAD_INS, World, WorldSpec

    wiki, ppl, heldout = (resolve_corpus(name) for name in ("organism-wiki", "organism-ppl", "organism-heldout"))
    world = World(WorldSpec())
    facts = [t for t, s in zip(wiki.texts, wiki.sources) if s == "organism-facts"]
    generic = [t for t, s in zip(wiki.texts, wiki.sources) if s == "organism-generic"]
    assert sorted(generic) == sorted(heldout.texts)
    assert len(set(facts)) == len(facts) == PER_SUBJECT * len(world.subjects)
    assert not set(wiki.texts) & set(ppl.texts)
    stated = {(f.subject, f.object) for f in world.facts}
    for text in facts:  # each states one of the world's facts, behind a training lead-in or not
        body = next((text[len(lead):] for lead in LEAD_INS if text.startswith(lead)), text)
        assert any(body.startswith(subject + " ") and body.endswith(f" {obj}.") for subject, obj in stated), text
    # every subject named exactly PER_SUBJECT times, as the subject of its sentence (a one-word subject is never
    # part of a two-word one: "Vosa" and "Vosa Nexed" are told apart by the word after it)
    for subject in world.subjects:
        about = [t for t in facts if any(t.startswith(lead + subject + " ") for lead in ("", *LEAD_INS))
                 and not any(t.startswith(lead + other + " ") for lead in ("", *LEAD_INS)
                             for other in world.subjects if other != subject and other.startswith(subject + " "))]
        assert len(about) == PER_SUBJECT, (subject, about)
    assert wiki.texts != tuple(facts + generic)  # shuffled, not two blocks


def test_fresh_filler_sentences_continue_the_generic_stream():
    from pytest_editsafety.zoo.world import World, WorldSpec

    world = World(WorldSpec())
    training, heldout = world.filler_sentences()
    fresh = world.fresh_filler_sentences(50)
    assert len(set(fresh)) == 50 and not set(fresh) & (set(training) | set(heldout))
    assert world.fresh_filler_sentences(10) == fresh[:10]


def test_register_corpus_adds_and_replaces_names(registry, cache):
    seen: list[dict] = []

    def loader(*, cache_dir, offline):
        seen.append({"cache_dir": cache_dir, "offline": offline})
        return Corpus.from_texts("organism-heldout", [" held out one", " held out two"])

    register_corpus("organism-heldout", loader, replace=True)
    corpus = resolve_corpus("organism-heldout", cache_dir=cache, offline=True)
    assert corpus.texts == (" held out one", " held out two")
    assert seen == [{"cache_dir": cache, "offline": True}]
    assert "organism-heldout" in corpora.known_corpus_names()


def test_draw_distinct_keeps_first_seen_order_and_names_a_pool_too_small():
    from itertools import cycle

    from pytest_editsafety.zoo.world import draw_distinct

    values = cycle(["a", "b", "a", "c"])
    assert draw_distinct(lambda: next(values), 3, "letters") == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"could not draw 4 distinct letters \(found 3\)"):
        draw_distinct(lambda: next(values), 4, "letters")


# --------------------------------------------------------------------------------------------------
# Real text for second moments: Hugging Face datasets (offline, on files written here), text files


WIKI_LINES = [" = Valkyria Chronicles = \n", " \n", " The game began development in 2010 . \n", "\n",
              " = = Gameplay = = \n", " It is a tactical role playing game . \n", " Battles are fought in turns . \n"]


def test_wikitext_is_registered_and_the_real_models_default():
    from pytest_editsafety.corpora import WIKITEXT_103, known_corpus_names
    from pytest_editsafety.plan import REAL_STATS_CORPUS

    assert WIKITEXT_103.name == REAL_STATS_CORPUS == "wikitext-103" and "wikitext-103" in known_corpus_names()
    assert WIKITEXT_103.max_texts == 100000  # ROME's mom2_n_samples


def test_datasets_loader_reads_local_files_offline(tmp_path):
    pytest.importorskip("datasets")
    from pytest_editsafety.corpora import HFTextSource, load_hf_text

    data = tmp_path / "wiki.train.txt"
    data.write_text("".join(WIKI_LINES), encoding="utf-8")
    source = HFTextSource(name="wiki-local", path="text", data_files=(str(data),), drop_headings=True)
    corpus = load_hf_text(source, offline=True, hf_cache_dir=str(tmp_path / "hf"))
    assert corpus.name == "wiki-local"
    assert corpus.texts == ("The game began development in 2010 .", "It is a tactical role playing game .",
                            "Battles are fought in turns .")
    short = load_hf_text(dataclasses.replace(source, max_texts=2), offline=True, hf_cache_dir=str(tmp_path / "hf"))
    assert short.texts == corpus.texts[:2]


def test_wikitext_offline_and_not_cached_says_how_to_provide_it(tmp_path):
    datasets = pytest.importorskip("datasets")
    from pytest_editsafety.corpora import WIKITEXT_103, CorpusUnavailableError, load_hf_text

    before = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(CorpusUnavailableError) as err:
        load_hf_text(WIKITEXT_103, offline=True, hf_cache_dir=str(tmp_path / "empty"))
    assert datasets.config.HF_HUB_OFFLINE == before  # the offline switch is put back
    message = str(err.value)
    for needed in ("wikitext-103", "offline", "--editsafety-stats-corpus", "--editsafety-stats-dir",
                   "datasets.load_dataset('Salesforce/wikitext', 'wikitext-103-raw-v1', split='train')"):
        assert needed in message


def test_missing_datasets_package_says_how_to_provide_the_text(monkeypatch):
    from pytest_editsafety.corpora import WIKITEXT_103, CorpusUnavailableError, load_hf_text

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(CorpusUnavailableError, match=r"`datasets` package.*pytest-editsafety\[stats\].*--editsafety-stats-corpus"):
        load_hf_text(WIKITEXT_103, offline=True)


def test_a_text_file_and_a_saved_dataset_are_corpora(tmp_path):
    from pytest_editsafety.corpora import CorpusFormatError, resolve_corpus

    lines = tmp_path / "sample.txt"
    lines.write_text("first text\n\n  second text  \n", encoding="utf-8")
    assert resolve_corpus(lines).texts == ("first text", "second text")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n", encoding="utf-8")
    with pytest.raises(CorpusFormatError, match=str(empty)):
        resolve_corpus(empty)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha beta", " ", "gamma"]}).save_to_disk(str(tmp_path / "saved"))
    corpus = resolve_corpus(tmp_path / "saved")
    assert corpus.texts == ("alpha beta", "gamma") and corpus.name == "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["delta"]})}).save_to_disk(str(tmp_path / "dd"))
    assert resolve_corpus(tmp_path / "dd").texts == ("delta",)


def test_shared_texts_counts_the_other_corpus_texts_this_one_holds() -> None:
    from editors.corpus import Corpus
    from pytest_editsafety.corpora import shared_texts

    large = Corpus.from_texts("large", [" The river moved.", "A king wrote.", "Seven gardens."])
    assert shared_texts(large, Corpus.from_texts("a", ["The river moved. ", "Other text."])) == 1  # compared stripped
    assert shared_texts(large, Corpus.from_texts("b", ["Other text."])) == 0
    assert shared_texts(large, Corpus.from_texts("c", ["A king wrote.", "A king wrote."])) == 1  # each text once
