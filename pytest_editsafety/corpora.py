"""Corpora: the ME-PPL JSON format, the papers' pinned ME-PPL files, real text for statistics through Hugging Face
``datasets``, and a name registry.

``resolve_corpus`` turns what a user passes as a corpus (``--editsafety-ppl-corpus``, ``--editsafety-stats-corpus``)
into a ``Corpus``: an existing path is loaded (ME-PPL JSON, a ``.txt`` file of one text per line, or a directory a
``datasets`` ``save_to_disk`` wrote); a registered name is handed to its loader. ``wikitext-103``, the real models'
default sample for second moments, comes from the ``datasets`` cache (optional extra ``stats``). The built-in ME-PPL names fetch the
papers' files once into the cache (pinned commit, sha256-checked) and re-check the hash on every load, so
a corrupted cache is reported rather than silently measured. The project never ships ME-PPL itself.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from editors.corpus import Corpus
from editors.storage import build_lock
from pytest_editsafety.cache import cache_root

log = logging.getLogger(__name__)

OFFLINE_ENVS = ("HF_HUB_OFFLINE", "EDITSAFETY_OFFLINE")
DOWNLOAD_TIMEOUT_S = 30.0
ME_PPL_REPO = "WanliYoung/Collapse-in-Model-Editing"
ME_PPL_COMMIT = "678beddf656385b660281de93a6650bb1b485ee9"
ME_PPL_FOLDER = "data/ME-PPL"


class CorpusError(ValueError):
    """Base class of every corpus problem."""


class CorpusFormatError(CorpusError):
    """A corpus file is not valid ME-PPL JSON."""


class CorpusUnavailableError(CorpusError):
    """A corpus cannot be found, downloaded or is unknown."""


class CorpusIntegrityError(CorpusError):
    """A corpus file's sha256 differs from its pin."""


@dataclass(frozen=True)
class PinnedFile:
    filename: str
    sha256: str

    @property
    def url(self) -> str:
        return f"https://raw.githubusercontent.com/{ME_PPL_REPO}/{ME_PPL_COMMIT}/{ME_PPL_FOLDER}/{self.filename}"


ME_PPL_FILES: dict[str, PinnedFile] = {
    "me-ppl-50": PinnedFile("ME-PPL_50.json", "55f3b951d2c4287b90d9e511f256efb9d47461f0da408a17dac5ffcef685c4e4"),
    "me-ppl-1k": PinnedFile("ME-PPL_1k.json", "71e29fc5daf443b35ec16c8a9e91e1f4398b5b84ca7c25393639c066b65b5afb"),
    "me-ppl-10k": PinnedFile("ME-PPL.json", "c09b3d8191ffad954bf3b5e96dac84a7caf83d57c15e262b1d81ef6590742fb4"),
}


# --------------------------------------------------------------------------------------------------
# The ME-PPL JSON format


def parse_me_ppl(data: bytes, *, origin: str, name: str) -> Corpus:
    """Parse ME-PPL JSON bytes (a list of ``{"Corpus": str, "Text": str}``); ``origin`` names the file."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusFormatError(f"{origin}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorpusFormatError(
            f"{origin}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(entries, list):
        raise CorpusFormatError(
            f"{origin}: expected a JSON list of {{\"Corpus\": ..., \"Text\": ...}} objects, "
            f"got a JSON {_json_type(entries)}"
        )
    if not entries:
        raise CorpusFormatError(f"{origin}: the list of sentences is empty")
    texts: list[str] = []
    sources: list[str] = []
    for index, entry in enumerate(entries):
        where = f"{origin}: entry {index}"
        if not isinstance(entry, dict):
            raise CorpusFormatError(
                f"{where}: expected an object with a \"Text\" field, got a JSON {_json_type(entry)}"
            )
        if "Text" not in entry:
            raise CorpusFormatError(f"{where}: missing field \"Text\" (fields present: {sorted(entry)})")
        value = entry["Text"]
        if not isinstance(value, str):
            raise CorpusFormatError(f"{where}: field \"Text\" must be a string, got a JSON {_json_type(value)}")
        if not value.strip():
            raise CorpusFormatError(f"{where}: field \"Text\" is empty")
        source = entry.get("Corpus", "")
        if not isinstance(source, str):
            raise CorpusFormatError(f"{where}: field \"Corpus\" must be a string, got a JSON {_json_type(source)}")
        texts.append(value)
        sources.append(source)
    return Corpus(name=name, texts=tuple(texts), sources=tuple(sources), sha256=sha)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CorpusUnavailableError(f"corpus file {path} does not exist") from None
    except IsADirectoryError:
        raise CorpusUnavailableError(f"corpus path {path} is a directory, expected an ME-PPL JSON file") from None
    except OSError as exc:
        raise CorpusUnavailableError(f"cannot read corpus file {path}: {exc}") from None


def load_me_ppl(path: str | os.PathLike[str], *, name: str | None = None) -> Corpus:
    """Load an ME-PPL JSON file; the corpus is named after the file unless ``name`` is given."""
    p = Path(path).expanduser()
    return parse_me_ppl(_read(p), origin=str(p), name=name or p.stem)


# --------------------------------------------------------------------------------------------------
# Built-in, downloaded and cached ME-PPL files


def is_offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"} for var in OFFLINE_ENVS)


def corpus_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where corpus files live: ``<cache root>/corpora``; ``cache_dir`` overrides the cache root."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    return root / "corpora"


def _how_to_provide(name: str, target: Path) -> str:
    pinned = ME_PPL_FILES[name]
    return (
        f"provide it by passing its path as the corpus (--editsafety-ppl-corpus /path/to/{pinned.filename}), or place the file at "
        f"{target} (sha256 {pinned.sha256}; from github.com/{ME_PPL_REPO}, folder {ME_PPL_FOLDER}, "
        f"commit {ME_PPL_COMMIT})"
    )


def _open_url(url: str, timeout: float):  # noqa: ANN202 - a file-like HTTP response
    """The one network call of this module, kept apart so tests can replace it."""
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 - fixed https URL


def _download(name: str, target: Path) -> None:
    """Fetch the pinned file to ``target``: hashed while streaming, moved into place only when it matches."""
    pinned = ME_PPL_FILES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, _open_url(pinned.url, DOWNLOAD_TIMEOUT_S) as response:
                while chunk := response.read(1 << 16):
                    digest.update(chunk)
                    out.write(chunk)
        except (OSError, http.client.HTTPException) as exc:
            # OSError covers URLError (HTTP status, DNS), timeouts and resets; HTTPException a truncated body.
            raise CorpusUnavailableError(
                f"corpus {name!r}: download from {pinned.url} failed ({exc}); {_how_to_provide(name, target)}"
            ) from None
        actual = digest.hexdigest()
        if actual != pinned.sha256:
            raise CorpusIntegrityError(
                f"corpus {name!r}: downloaded file from {pinned.url} has sha256 {actual}, "
                f"expected {pinned.sha256}; nothing was cached"
            )
        os.replace(tmp, target)
        log.info("downloaded corpus %s to %s", name, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_builtin_me_ppl(name: str, *, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
    """The pinned ME-PPL file ``name`` from ``corpus_cache_dir(cache_dir)``, downloaded on first use.

    ``offline=None`` reads ``HF_HUB_OFFLINE`` / ``EDITSAFETY_OFFLINE``.
    """
    pinned = ME_PPL_FILES[name]
    target = corpus_cache_dir(cache_dir) / pinned.filename
    offline = is_offline() if offline is None else offline
    if not target.exists():
        if offline:
            raise CorpusUnavailableError(
                f"corpus {name!r} is not cached and downloads are off (offline mode: "
                f"{' or '.join(OFFLINE_ENVS)}); {_how_to_provide(name, target)}"
            )
        with build_lock(target):
            if not target.exists():  # another process may have fetched it while we waited
                _download(name, target)
    data = _read(target)
    actual = hashlib.sha256(data).hexdigest()
    if actual != pinned.sha256:
        raise CorpusIntegrityError(
            f"corpus {name!r}: cached file {target} has sha256 {actual}, expected {pinned.sha256}; "
            f"the cache is corrupted or the file is not the pinned one: delete it to download again, or "
            f"{_how_to_provide(name, target)}"
        )
    return parse_me_ppl(data, origin=str(target), name=name)


# --------------------------------------------------------------------------------------------------
# Real text for second-moment statistics, through Hugging Face ``datasets``

# ROME takes C over 100,000 Wikipedia texts (mom2_n_samples); the sample holds that many so that the papers'
# setting is honoured, and a smaller mom2_n_samples takes its first texts.
STATS_SAMPLE_TEXTS = 100000


@dataclass(frozen=True)
class HFTextSource:
    """A text column of a Hugging Face dataset, loaded with ``datasets.load_dataset`` through its cache
    (``HF_HOME`` / ``HF_DATASETS_CACHE``): the first ``max_texts`` non-blank texts of ``split``, stripped,
    wikitext's ``= Heading =`` lines left out when ``drop_headings``."""

    name: str
    path: str
    config: str | None = None
    split: str = "train"
    column: str = "text"
    data_files: tuple[str, ...] | None = None
    max_texts: int = STATS_SAMPLE_TEXTS
    drop_headings: bool = False

    def prefetch_command(self) -> str:
        args = ", ".join(repr(a) for a in (self.path, self.config) if a is not None)
        return f"python -c \"import datasets; datasets.load_dataset({args}, split={self.split!r})\""


# wikitext-103 (Merity et al. 2016): verified Wikipedia articles, the closest well-kept stand-in for ROME's
# Wikipedia dump that `datasets` still serves (the "wikipedia" loading script is gone); one paragraph a text.
WIKITEXT_103 = HFTextSource(name="wikitext-103", path="Salesforce/wikitext", config="wikitext-103-raw-v1",
                            drop_headings=True)


def _how_to_provide_stats(source: HFTextSource, reason: str) -> str:
    return (
        f"statistics corpus {source.name!r} ({source.path}, {source.config or 'default'}, split {source.split}) "
        f"{reason}. Either fetch it once on a machine with internet access into the Hugging Face cache "
        f"(pip install 'pytest-editsafety[stats]'; {source.prefetch_command()}; then copy HF_HOME, and set "
        f"HF_HUB_OFFLINE=1 where there is none), or pass local text with --editsafety-stats-corpus PATH (an "
        f"ME-PPL JSON file, a .txt file of one text per line, or a directory written by datasets' save_to_disk), "
        f"or ROME's statistics files with --editsafety-stats-dir DIR"
    )


@contextmanager
def _datasets_offline(datasets_module: Any, offline: bool) -> Iterator[None]:
    """``datasets`` reads HF_HUB_OFFLINE once, at import; EDITSAFETY_OFFLINE (or ``offline=True``) must keep it
    off the network too, so its flag is raised for the duration of one load and put back."""
    config = datasets_module.config
    before = config.HF_HUB_OFFLINE
    if offline and not before:
        config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE = before


def load_hf_text(source: HFTextSource, *, offline: bool | None = None, hf_cache_dir: str | None = None) -> Corpus:
    """``source``'s texts as a ``Corpus`` named ``source.name``; ``offline=None`` reads the environment.
    ``hf_cache_dir`` overrides ``datasets``' cache (tests). A missing ``datasets``, or a dataset neither cached
    nor reachable, is a :class:`CorpusUnavailableError` saying how to provide the text."""
    try:
        import datasets
    except ImportError:
        raise CorpusUnavailableError(_how_to_provide_stats(source, "needs the `datasets` package, which is not "
                                                                   "installed")) from None
    offline = is_offline() if offline is None else offline
    try:
        with _datasets_offline(datasets, offline):
            dataset = datasets.load_dataset(
                source.path, source.config, split=source.split, cache_dir=hf_cache_dir,
                data_files=list(source.data_files) if source.data_files else None,
            )
    except (ConnectionError, OSError, ValueError) as err:
        # datasets reports "not cached and offline" as ConnectionError, a missing dataset as FileNotFoundError
        # or DatasetNotFoundError (a FileNotFoundError), a bad config as ValueError
        mode = "offline" if offline else "online"
        raise CorpusUnavailableError(_how_to_provide_stats(
            source, f"could not be loaded ({mode}: {type(err).__name__}: {err})")) from None
    return _texts_of(dataset, source.name, source.column, source.max_texts, drop_headings=source.drop_headings,
                     origin=f"{source.path} ({source.config or 'default'}, split {source.split})")


def _is_heading(text: str) -> bool:
    return text.startswith("=") and text.endswith("=")


def _texts_of(dataset: Any, name: str, column: str, max_texts: int, *, drop_headings: bool, origin: str) -> Corpus:
    if column not in dataset.column_names:
        raise CorpusFormatError(f"{origin}: no column {column!r} (columns: {dataset.column_names})")
    texts: list[str] = []
    for batch in dataset.iter(batch_size=10000):
        for raw in batch[column]:
            text = raw.strip() if isinstance(raw, str) else ""
            if text and not (drop_headings and _is_heading(text)):
                texts.append(text)
                if len(texts) >= max_texts:
                    break
        if len(texts) >= max_texts:
            break
    if not texts:
        raise CorpusFormatError(f"{origin}: column {column!r} holds no non-blank text")
    return Corpus.from_texts(name, texts)


def load_saved_dataset(path: Path, *, column: str = "text", max_texts: int = STATS_SAMPLE_TEXTS) -> Corpus:
    """A directory ``datasets``' ``save_to_disk`` wrote (a dataset, or a dataset dict: its ``train`` split)."""
    if not any((path / marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        raise CorpusUnavailableError(f"corpus path {path} is a directory, but not one written by datasets' "
                                     f"save_to_disk (no state.json or dataset_dict.json); expected that, an ME-PPL "
                                     f"JSON file or a .txt file")
    try:
        import datasets
    except ImportError:
        raise CorpusUnavailableError(f"corpus directory {path} needs the `datasets` package to read "
                                     f"(pip install 'pytest-editsafety[stats]')") from None
    try:
        loaded = datasets.load_from_disk(str(path))
    except (FileNotFoundError, OSError, ValueError) as err:
        raise CorpusFormatError(f"corpus directory {path} is not a dataset written by datasets' save_to_disk "
                                f"({err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise CorpusFormatError(f"corpus directory {path}: a dataset dict without a 'train' split "
                                    f"(splits: {sorted(loaded)})")
        loaded = loaded["train"]
    return _texts_of(loaded, path.name, column, max_texts, drop_headings=False, origin=f"corpus directory {path}")


def load_text_lines(path: Path) -> Corpus:
    """A UTF-8 text file, one text per non-blank line, named after the file."""
    data = _read(path)
    try:
        lines = data.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise CorpusFormatError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise CorpusFormatError(f"{path}: holds no non-blank line")
    return Corpus.from_texts(path.stem, texts)


def load_corpus_path(path: str | os.PathLike[str]) -> Corpus:
    """A corpus from a path: a ``datasets`` directory, a ``.txt`` file (one text per line), else ME-PPL JSON."""
    p = Path(path).expanduser()
    if p.is_dir():
        return load_saved_dataset(p)
    if p.suffix.lower() == ".txt":
        return load_text_lines(p)
    return load_me_ppl(p)


# --------------------------------------------------------------------------------------------------
# Registry and resolution


class CorpusLoader(Protocol):
    def __call__(self, *, cache_dir: Path | None, offline: bool | None) -> Corpus: ...


def _builtin_loader(name: str) -> CorpusLoader:
    def load(*, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
        return load_builtin_me_ppl(name, cache_dir=cache_dir, offline=offline)

    return load


# A registry of loaders (not a cache); ``register_corpus`` adds more. The model organisms' corpora
# (pytest_editsafety.zoo.corpus) are generated, never downloaded, and shared, as the organisms share one world:
# "organism" and "organism-ppl" are their perplexity corpus, "organism-wiki" the text C comes from (Wikipedia's part),
# "organism-heldout" its generic sentences alone.
def _organism_ppl(*, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
    from pytest_editsafety.zoo.corpus import perplexity_corpus

    return perplexity_corpus()


def _organism_heldout(*, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
    from pytest_editsafety.zoo.corpus import heldout_corpus

    return heldout_corpus()


def _organism_wiki(*, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
    from pytest_editsafety.zoo.corpus import encyclopedia_corpus

    return encyclopedia_corpus()


CORPUS_LOADERS: dict[str, CorpusLoader] = {name: _builtin_loader(name) for name in ME_PPL_FILES}
CORPUS_LOADERS.update({"organism": _organism_ppl, "organism-ppl": _organism_ppl,
                       "organism-heldout": _organism_heldout, "organism-wiki": _organism_wiki})


def _hf_loader(source: HFTextSource) -> CorpusLoader:
    def load(*, cache_dir: Path | None = None, offline: bool | None = None) -> Corpus:
        # datasets keeps its own cache (HF_HOME), shared with every other tool; cache_dir is this project's
        return load_hf_text(source, offline=offline)

    return load


CORPUS_LOADERS[WIKITEXT_103.name] = _hf_loader(WIKITEXT_103)


def register_corpus(name: str, loader: CorpusLoader | Callable[..., Corpus], *, replace: bool = False) -> None:
    """Make ``name`` resolvable; ``loader(cache_dir=..., offline=...)`` returns the ``Corpus``."""
    key = name.lower()
    if key in CORPUS_LOADERS and not replace:
        raise ValueError(f"corpus name {name!r} is already registered")
    CORPUS_LOADERS[key] = loader


def known_corpus_names() -> tuple[str, ...]:
    return tuple(sorted(CORPUS_LOADERS))


def shared_texts(corpus: Corpus, other: Corpus) -> int:
    """How many of ``other``'s texts ``corpus`` holds too (compared stripped): a second moment C taken over text
    that the perplexity then scores is fitted to that text's keys."""
    mine = {text.strip() for text in corpus.texts}
    return sum(1 for text in {t.strip() for t in other.texts} if text in mine)


def resolve_corpus(
    name_or_path: str | os.PathLike[str], *, cache_dir: Path | None = None, offline: bool | None = None
) -> Corpus:
    """A corpus from an existing path (:func:`load_corpus_path`) or a registered name (``known_corpus_names``).

    ``cache_dir`` overrides the cache root (as ``--editsafety-cache`` does); ``offline=None`` reads the
    environment. A path wins over a name of the same spelling.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return load_corpus_path(path)
    key = str(name_or_path).strip().lower()
    loader = CORPUS_LOADERS.get(key)
    if loader is not None:
        return loader(cache_dir=cache_dir, offline=offline)
    raise CorpusUnavailableError(
        f"unknown corpus {str(name_or_path)!r}: not an existing file and not a known name; "
        f"known names: {', '.join(known_corpus_names())}"
    )
