"""Editor hyper-parameters as data files: built-in JSON per (editor, model), a user file, then overrides.

Files live in ``editors/hparams/<editor>/<key>.json`` where ``<key>`` is a built-in model name (``gpt2-xl``,
``tiny-gpt2``, ...) or a family default (``gpt2``, ``gptj``, ``llama``). Every file carries a ``"_comment"``
saying where its numbers come from. The keys a file may use are the fields of the editor's frozen hparams
dataclass (``RomeHparams``, ``MemitHparams``, ``FtHparams``, ``MendHparams``, ``EmmetHparams``,
``AlphaEditHparams``); anything else is an error
naming the file.

Named sets: ``editors/hparams/<editor>/<name>/<key>.json`` hold an alternative published setting the user
selects by name where a hyper-parameters file is taken (``user_file="kmeng01"``, ``--hparams kmeng01``):
a bare name that is not an existing file is looked up among the editor's named sets, by the same model
keys and family as the defaults, and layered where a user file would be. :func:`named_hparams_sets` lists
them (``rome``: ``kmeng01``, ROME's original configs with ``mom2_adjustment`` on).

Layer values may be symbolic for the organisms, whose editable site is found when they are built:
``"causal"`` is ``model.config.editsafety_causal_layer`` (0 when absent) and ``"causal+N"`` is N layers
after it; ``"last"`` is the model's last layer and ``"last-N"`` N layers before it (MEND edits the last
layers, whatever the depth); ``"K/N"`` is layer K of N at the same share of the model's depth.
:func:`resolve_layers` (:mod:`editors.layers`) turns them into indices against a loaded model.

This module imports neither torch nor the editors at import time: the plugin can read it at startup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from editors.hparams_errors import HparamsError, LayerOutOfRangeError, UnknownHparamsKeyError
from editors.jsontext import StrictJsonError, loads_strict
from editors.layers import is_symbolic, parse_layers, resolve_layers

__all__ = [
    "COMMENT_KEY",
    "OVERRIDES_LABEL",
    "HparamsError",
    "HparamsLayer",
    "HparamsSchema",
    "LayeredHparams",
    "UnknownHparamsKeyError",
    "builtin_hparams_keys",
    "hparams_from_mapping",
    "hparams_hash",
    "layer_hparams",
    "load_hparams",
    "LayerOutOfRangeError",
    "layer_setting",
    "named_hparams_sets",
    "read_hparams_file",
    "resolve_hparams_layers",
    "resolve_layers",
    "schema_for",
    "user_layers",
]

COMMENT_KEY = "_comment"
# the label of values a caller gives as a mapping or as overrides rather than in a file (HparamsLayer.label)
OVERRIDES_LABEL = "overrides"
# what a user layers over the built-in file: a JSON file or a named set's name, several in order, or none
UserFiles = str | Path | Sequence[str | Path] | None
# File stems must be plain names: a Hugging Face id ("owner/name") never addresses a file here.
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Names of named sets: no dot (never a file name such as "x.json"), no path separator.
_SET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class HparamsSchema:
    """Where an editor's hparams live and which dataclass defines their keys."""

    directory: str  # subdirectory of editors/hparams
    module: str
    class_name: str
    layer_key: str  # the field holding the edited layer(s)
    many_layers: bool  # True: a list of layers (MEMIT); False: exactly one

    def dataclass(self) -> type:
        return getattr(importlib.import_module(self.module), self.class_name)

    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.dataclass()))


_ROME = HparamsSchema("rome", "editors.rome", "RomeHparams", "layer", many_layers=False)
_SCHEMAS: Mapping[str, HparamsSchema] = {
    # the three ROME variants differ in key convention and test prefix, not in hyper-parameters
    "rome": _ROME,
    "c-rome": _ROME,
    "c-rome-prefix": _ROME,
    "memit": HparamsSchema("memit", "editors.memit", "MemitHparams", "layers", many_layers=True),
    "ft-linf": HparamsSchema("ft-linf", "editors.ft", "FtHparams", "layer", many_layers=False),
    "mend": HparamsSchema("mend", "editors.mend", "MendHparams", "layers", many_layers=True),
    # r-ROME has ROME's hyper-parameters and files of its own (its authors' configs turn mom2_adjustment on)
    "r-rome": HparamsSchema("r-rome", "editors.rome", "RomeHparams", "layer", many_layers=False),
    "emmet": HparamsSchema("emmet", "editors.emmet", "EmmetHparams", "layers", many_layers=True),
    "alphaedit": HparamsSchema("alphaedit", "editors.alphaedit", "AlphaEditHparams", "layers", many_layers=True),
}


def schema_for(editor: str) -> HparamsSchema | None:
    """The schema of a built-in editor, or None for an editor without built-in hparams (third-party)."""
    return _SCHEMAS.get(editor)


def _builtin_root():
    return resources.files("editors").joinpath("hparams")


def builtin_hparams_keys(editor: str) -> tuple[str, ...]:
    """The model/family keys that have a built-in file for ``editor``, sorted."""
    schema = _require_schema(editor)
    folder = _builtin_root().joinpath(schema.directory)
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json")))


def _require_schema(editor: str) -> HparamsSchema:
    schema = _SCHEMAS.get(editor)
    if schema is None:
        raise HparamsError(f"no built-in hyper-parameters for editor {editor!r}; built-in: {', '.join(_SCHEMAS)}")
    return schema


def read_hparams_file(path: str | Path | Any) -> dict[str, Any]:
    """Parse one hparams JSON file (a path or an importlib.resources traversable) into a dict."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise HparamsError(f"{path}: cannot read hyper-parameters file: {err}") from err
    try:
        data = loads_strict(text)
    except json.JSONDecodeError as err:
        raise HparamsError(f"{path}: not valid JSON: {err}") from err
    except StrictJsonError as err:
        raise HparamsError(f"{path}: {err}") from err
    if not isinstance(data, dict):
        raise HparamsError(f"{path}: expected a JSON object of hyper-parameters, got {type(data).__name__}")
    comment = data.get(COMMENT_KEY)
    if comment is not None and not isinstance(comment, str):
        raise HparamsError(f"{path}: {COMMENT_KEY!r} must be a string")
    return data


def _check_keys(data: Mapping[str, Any], known: Sequence[str], source: str, editor: str) -> None:
    for key in data:
        if key == COMMENT_KEY:
            continue
        if key not in known:
            raise UnknownHparamsKeyError(
                f"{source}: unknown hyper-parameter {key!r} for editor {editor!r}; known: {', '.join(known)}"
            )


def check_hparams_values(editor: str, data: Mapping[str, Any], source: str) -> None:
    """What can be checked of a file of ``editor``'s hyper-parameters before a model is known: every key is one of
    its fields and every value but the layers has the field's type; the layers (ints, lists or symbolic such as
    ``"causal"``) are well formed (:func:`parse_layers`), and resolved against the model later, as are ranges that
    depend on it. Raises
    :class:`HparamsError` naming ``source`` and the key; an editor without built-in hyper-parameters (a
    third-party one) is not checked here."""
    schema = _SCHEMAS.get(editor)
    if schema is None:
        return
    cls = schema.dataclass()
    _check_keys(data, schema.field_names(), source, editor)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        # the layer key takes more shapes than its field's type (an int or a list either way, symbolic layers),
        # all resolved against the model (resolve_hparams_layers)
        if key != COMMENT_KEY and key != schema.layer_key:
            _coerce(value, hints[key], f"{source}: {key}")
        elif key == schema.layer_key:
            parse_layers(value, f"{source}: ")


def named_hparams_sets(editor: str) -> tuple[str, ...]:
    """The names of ``editor``'s built-in named sets (subdirectories of its hparams directory), sorted."""
    schema = _require_schema(editor)
    folder = _builtin_root().joinpath(schema.directory)
    if not folder.is_dir():
        return ()
    return tuple(sorted(p.name for p in folder.iterdir()
                        if p.is_dir() and _SET_RE.match(p.name) and any(c.name.endswith(".json") for c in p.iterdir())))


def _builtin_file(schema: HparamsSchema, editor: str, model_keys: Sequence[str], family: str | None,
                  named: str | None = None):
    """The built-in file (``named``: of that named set) for the first of ``model_keys`` that has one, else the
    one for ``family``; with its display name (``editors/hparams/<dir>/[<set>/]<key>.json``)."""
    parts = (schema.directory,) if named is None else (schema.directory, named)
    folder = _builtin_root().joinpath(*parts)
    for key in (*(k.partition("@")[0] for k in model_keys), family):  # a pinned revision: the same numbers
        if key and _KEY_RE.match(key):
            candidate = folder.joinpath(f"{key}.json")
            if candidate.is_file():
                return candidate, "/".join(("editors", "hparams", *parts, f"{key}.json"))
    tried = " or ".join(map(repr, model_keys))
    tried += f" (family {family!r})" if family else " (unknown family: pass family=...)"
    if named is not None:
        covered = sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))
        raise HparamsError(f"the built-in named {editor!r} hyper-parameters {named!r} have no file for model {tried}; "
                           f"they cover: {', '.join(covered)}")
    raise HparamsError(
        f"no built-in {editor!r} hyper-parameters for model {tried}"
        f"; built-in keys: {', '.join(builtin_hparams_keys(editor))}; give a user hparams file instead"
    )


def _named_set(editor: str, user_file: str | Path) -> str | None:
    """The named set ``user_file`` selects: a bare name (no separator, no dot) that is not an existing file."""
    text = str(user_file)
    if not _SET_RE.match(text) or Path(text).is_file():
        return None
    names = named_hparams_sets(editor)
    if text not in names:
        raise HparamsError(
            f"{text}: no such hyper-parameters file, nor a built-in named set of {editor!r} hyper-parameters "
            f"(named sets: {', '.join(names) or 'none'})"
        )
    return text


@dataclass(frozen=True)
class HparamsLayer:
    """One source of hyper-parameters: ``role`` is ``built-in``, ``named``, ``user`` or ``overrides``."""

    role: str
    label: str  # what it is called in messages and listings: a file's display name, or "overrides"
    path: str | None  # the file read, None for overrides
    keys: tuple[str, ...]
    comment: str | None = None


@dataclass(frozen=True)
class LayeredHparams:
    """The merged hyper-parameters, which layer each value came from, and the layers in order."""

    values: dict[str, Any]
    sources: dict[str, str]  # key -> label of the last layer that set it
    layers: tuple[HparamsLayer, ...]


def layer_hparams(
    editor: str,
    model_key: str | Sequence[str],
    *,
    user_file: UserFiles = None,
    overrides: Mapping[str, Any] | None = None,
    family: str | None = None,
) -> LayeredHparams:
    """:func:`load_hparams`, telling for each value the layer it came from."""
    schema = _require_schema(editor)
    known = schema.field_names()
    keys = (model_key,) if isinstance(model_key, str) else tuple(model_key)
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    layers: list[HparamsLayer] = []

    def add(role: str, label: str, path: str | None, data: Mapping[str, Any], where: str) -> None:
        _check_keys(data, known, where, editor)
        values = {k: v for k, v in data.items() if k != COMMENT_KEY}
        merged.update(values)
        sources.update(dict.fromkeys(values, label))
        layers.append(HparamsLayer(role, label, path, tuple(values), data.get(COMMENT_KEY)))

    for role, label, where, path in _files(schema, editor, keys, family, user_file):
        add(role, label, where, read_hparams_file(path), where)
    if overrides:
        add("overrides", OVERRIDES_LABEL, None, overrides, OVERRIDES_LABEL)
    required = [f.name for f in dataclasses.fields(schema.dataclass())
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [k for k in required if k not in merged]
    if missing:
        raise HparamsError(f"{layers[0].path}: missing required hyper-parameter(s) {', '.join(missing)} for {editor!r}")
    return LayeredHparams(merged, sources, tuple(layers))


def layer_setting(editor: str, model_key: str | Sequence[str], *, user_file: UserFiles = None,
                  family: str | None = None) -> tuple[Any, str]:
    """``editor``'s layer field on ``model_key`` and the label of the file that set it, as :func:`layer_hparams`
    layers them (the built-in file, then each named set or user file that holds the field), without importing the
    editor (and torch): what a run checks against a model's depth before loading it."""
    schema = _require_schema(editor)
    keys = (model_key,) if isinstance(model_key, str) else tuple(model_key)
    value, label = None, ""
    for role, file_label, _, path in _files(schema, editor, keys, family, user_file):
        data = read_hparams_file(path)
        if role == "built-in" or schema.layer_key in data:
            value, label = data.get(schema.layer_key), file_label
    return value, label


def user_layers(user_file: UserFiles) -> tuple[str | Path, ...]:
    """``user_file`` as the sequence of files and named sets it layers, in order: one, several, or none."""
    if user_file is None:
        return ()
    if isinstance(user_file, (str, Path)):
        return (user_file,)
    return tuple(user_file)


def _files(schema: HparamsSchema, editor: str, keys: tuple[str, ...], family: str | None,
           user_file: UserFiles) -> list[tuple[str, str, str, Any]]:
    """The files an editor's hyper-parameters are layered from, in order, as ``(role, label, where, path)``: the
    built-in file for the model (else its family), then each named set's file or user file in the order given
    (``kmeng01`` then ``my.json``: ROME's original setting with the user's changes on top); ``path`` is what
    :func:`read_hparams_file` reads (a package resource for the built-in files), ``where`` its name in messages."""
    path, label = _builtin_file(schema, editor, keys, family)
    files = [("built-in", label, str(path), path)]
    for layer in user_layers(user_file):
        named = _named_set(editor, layer)
        if named is not None:
            path, label = _builtin_file(schema, editor, keys, family, named=named)
            files.append(("named", label, str(path), path))
        else:
            files.append(("user", str(layer), str(layer), Path(layer)))
    return files


def load_hparams(
    editor: str,
    model_key: str | Sequence[str],
    *,
    user_file: UserFiles = None,
    overrides: Mapping[str, Any] | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """Hyper-parameters for ``editor`` on ``model_key``: built-in file, then ``user_file``, then ``overrides``.

    The built-in file is ``<editor>/<model_key>.json`` when it exists (``model_key`` may list several keys,
    tried in order: a model organism's own name, then its family's organism settings), else the family
    default ``<editor>/<family>.json`` (``family``: the model's architecture family, e.g. ``gpt2``).
    ``user_file`` is a JSON file, or the name of a built-in named set (``"kmeng01"``: the file
    ``<editor>/kmeng01/<key>.json`` found by the same keys and family), or a sequence of them layered in order
    (``("kmeng01", "my.json")``). Later sources replace earlier keys;
    unknown keys are errors that name the source. The result has no ``_comment`` and may hold symbolic layers
    (see :func:`resolve_layers`).
    """
    return dict(layer_hparams(editor, model_key, user_file=user_file, overrides=overrides, family=family).values)


def hparams_hash(d: Mapping[str, Any], length: int = 16) -> str:
    """sha256 of the hyper-parameters as canonical JSON (sorted keys, comments dropped), first ``length`` hex.

    Tuples and lists hash alike, so a dict and its dataclass (``dataclasses.asdict``) agree.
    """
    clean = {k: v for k, v in d.items() if not k.startswith("_")}
    try:
        blob = json.dumps(clean, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise HparamsError(f"hparams_hash: hyper-parameters must be JSON values: {err}") from err
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def resolve_hparams_layers(editor: str, hparams: Mapping[str, Any], model: Any, *,
                           source: str = "") -> dict[str, Any]:
    """A copy of ``hparams`` whose layer field holds concrete indices for ``model``; ``source`` names where the
    layer field came from in the messages of errors about it (:func:`resolve_layers`)."""
    schema = _require_schema(editor)
    out = dict(hparams)
    layers = resolve_layers(out[schema.layer_key], model, source=source)
    if schema.many_layers:
        out[schema.layer_key] = layers
    else:
        if len(layers) != 1:
            raise HparamsError(f"{editor}: {schema.layer_key!r} must name exactly one layer, got {layers}")
        out[schema.layer_key] = layers[0]
    return out


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise HparamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise HparamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise HparamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise HparamsError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise HparamsError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise HparamsError(f"{where}: expected {len(args)} items, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    return value  # a type this loader does not police (e.g. Any)


def hparams_from_mapping(cls: type, hparams: Mapping[str, Any], *, source: str = "hparams"):
    """Build the frozen dataclass ``cls`` from ``hparams`` (lists become tuples; types are checked).

    Symbolic layers must have been resolved first (:func:`resolve_hparams_layers`).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in hparams.items():
        if key.startswith("_"):
            continue
        if key not in names:
            raise UnknownHparamsKeyError(f"{source}: unknown hyper-parameter {key!r} for {cls.__name__}")
        if is_symbolic(value) and hints[key] is not str:
            raise HparamsError(f"{source}: {key}={value!r} is symbolic; resolve it against the model first")
        kwargs[key] = _coerce(value, hints[key], f"{source}: {key}")
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise HparamsError(f"{source}: cannot build {cls.__name__}: {err}") from err
    except ValueError as err:  # a value outside its field's domain: the dataclass names the field
        raise HparamsError(f"{source}: {err}") from err
