"""Editors by name, every one of them an entry point: the built-ins and whatever installed packages register.

An editor is registered by declaring an entry point in the group ``editsafety.editors``; it loads a factory
``factory(hparams: Mapping[str, Any]) -> Editor`` (:mod:`editors.base`). The built-ins are declared the same
way in this distribution's ``pyproject.toml``::

    [project.entry-points."editsafety.editors"]
    my-editor = "my_package:make_editor"

Entry points are read on every call (a directory scan, cheap next to any edit), so there is no
process-global registry to go stale or leak between tests. A name registered by two distributions is an
error naming both.

This module imports neither torch nor the editors at import time; factories import them when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from editors.hparams import (
    COMMENT_KEY,
    OVERRIDES_LABEL,
    HparamsError,
    UserFiles,
    check_hparams_values,
    layer_hparams,
    read_hparams_file,
    resolve_hparams_layers,
    schema_for,
    user_layers,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "EditorFactoryError",
    "EditorNameClashError",
    "EditorRegistryError",
    "UnknownEditorError",
    "available_editors",
    "build_editor",
    "build_editor_with_sources",
    "check_user_hparams",
    "editor_distributions",
    "get_editor",
    "third_party_hparams",
]


ENTRY_POINT_GROUP = "editsafety.editors"
# the distribution whose editors are listed first
BUILTIN_DISTRIBUTION = "pytest-editsafety"
Factory = Callable[..., Any]


class EditorRegistryError(ValueError):
    """Something is wrong with the set of registered editors (names the distribution at fault)."""


class EditorNameClashError(EditorRegistryError):
    pass


class EditorFactoryError(EditorRegistryError):
    """An entry point that does not load, or a factory that does not return an Editor."""


class UnknownEditorError(ValueError):
    """No editor of that name; the message lists the available ones."""


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _registered() -> dict[str, metadata.EntryPoint]:
    """Entry points of the group by name, after checking that no name is taken twice."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            other = found[ep.name]
            if (_dist_name(other), other.value) == (_dist_name(ep), ep.value):
                continue  # the same distribution seen through two sys.path entries
            raise EditorNameClashError(
                f"editor {ep.name!r} is registered by both {_dist_name(other)!r} ({other.value}) and "
                f"{_dist_name(ep)!r} ({ep.value}); uninstall one"
            )
        found[ep.name] = ep
    return found


def _listing(registered: Mapping[str, metadata.EntryPoint]) -> tuple[str, ...]:
    # sorted, not metadata order: build back-ends sort entry points when they write them
    builtin = sorted(name for name, ep in registered.items() if _dist_name(ep) == BUILTIN_DISTRIBUTION)
    return tuple(builtin) + tuple(sorted(name for name in registered if name not in builtin))


def available_editors() -> tuple[str, ...]:
    """The built-in editors, then the other installed ones, each sorted by name."""
    return _listing(_registered())


def editor_distributions(names: Sequence[str]) -> dict[str, str]:
    """``{distribution: version}`` of the installed distributions other than this project's that register any of
    ``names`` (a certificate names the code it certified); names no entry point registers are left out."""
    registered = _registered()
    found: dict[str, str] = {}
    for name in names:
        ep = registered.get(name)
        dist = getattr(ep, "dist", None)
        if dist is not None and dist.name != BUILTIN_DISTRIBUTION:
            found[dist.name] = dist.version
    return found


def _factory(name: str) -> tuple[Factory, str]:
    """The factory for ``name`` and a description of where it came from (for error messages)."""
    registered = _registered()
    ep = registered.get(name)
    if ep is None:
        raise UnknownEditorError(f"unknown editor {name!r}; available: {', '.join(_listing(registered))}")
    where = f"entry point {ep.name!r} = {ep.value!r} of distribution {_dist_name(ep)!r}"
    try:
        factory = ep.load()
    except Exception as err:  # any import-time failure of a plugin is reported with its origin
        raise EditorFactoryError(f"{where}: cannot load: {type(err).__name__}: {err}") from err
    if not callable(factory):
        raise EditorFactoryError(f"{where}: loads {factory!r}, which is not callable")
    return factory, where


def get_editor(name: str, hparams: Mapping[str, Any] | None = None):
    """A new editor ``name`` built by its factory from ``hparams`` (layers already resolved)."""
    from editors.base import Editor

    factory, where = _factory(name)
    try:
        editor = factory(dict(hparams or {}))
    except HparamsError:
        raise
    except (TypeError, ValueError) as err:  # a third-party factory's complaint, told with where it came from
        raise EditorFactoryError(f"editor {name!r} ({where}): factory call failed: {err}") from err
    if not isinstance(editor, Editor):
        raise EditorFactoryError(
            f"editor {name!r} ({where}): factory returned {type(editor).__name__}, which lacks the Editor "
            "protocol of editors.base (name, hparams, needs(), setup(), parameters_touched(), apply(), "
            "denominator(), provenance(); subclass editors.base.EditorBase for the optional ones)"
        )
    return editor


def check_user_hparams(name: str, paths: Sequence[Path]) -> None:
    """What can be checked of the user's hyper-parameter files ``paths`` for editor ``name`` (layered in that order)
    before a model is known, so that a typo is one usage error and not an error in every test of the editor.

    A built-in's keys and value types are checked file by file against its dataclass
    (:func:`editors.hparams.check_hparams_values`). A third-party editor knows its hyper-parameters only through
    its factory, so the factory builds it once from the files' values merged in order, as :func:`build_editor`
    would (no model): whatever it raises is an :class:`EditorFactoryError` naming the files."""
    if schema_for(name) is not None:
        for path in paths:
            check_hparams_values(name, read_hparams_file(path), str(path))
        return
    where = ", ".join(str(path) for path in paths)
    try:
        get_editor(name, third_party_hparams(paths)[0])
    except (EditorFactoryError, HparamsError) as err:
        raise EditorFactoryError(f"{where}: {err}") from err
    except Exception as err:  # whatever the factory raises is the files' fault as far as a run can tell
        raise EditorFactoryError(f"{where}: editor {name!r}: factory call failed: {type(err).__name__}: {err}"
                                 ) from err


def third_party_hparams(user_hparams: UserFiles | Mapping[str, Any] = None,
                        overrides: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """What a third-party editor's factory gets, as :func:`build_editor` gives it: ``user_hparams`` (files and named
    sets' files read in order, or a mapping) then ``overrides``, comments dropped; and each key's source (the file
    as given, or :data:`editors.hparams.OVERRIDES_LABEL`)."""
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def add(values: Mapping[str, Any], label: str) -> None:
        values = {key: value for key, value in values.items() if key != COMMENT_KEY}
        merged.update(values)
        sources.update(dict.fromkeys(values, label))

    if isinstance(user_hparams, Mapping):
        add(user_hparams, OVERRIDES_LABEL)
    else:
        for layer in user_layers(user_hparams):
            add(read_hparams_file(Path(layer)), str(layer))
    add(overrides or {}, OVERRIDES_LABEL)
    return merged, sources


def build_editor(
    name: str,
    model_key: str | tuple[str, ...],
    model: Any,
    *,
    user_hparams: UserFiles | Mapping[str, Any] = None,
    overrides: Mapping[str, Any] | None = None,
):
    """The editor ``name`` configured for ``model`` (known to the user as ``model_key``, or by several keys
    tried in order; see :func:`editors.hparams.load_hparams`).

    Built-ins read their hparams with :func:`editors.hparams.load_hparams` (built-in file for the model or its
    family, then ``user_hparams``, a JSON file or named set, several in order, or a mapping, then ``overrides``) and
    resolve symbolic layers (``"causal"``) against ``model.config``. A third-party editor gets ``user_hparams``
    then ``overrides`` as they are.
    """
    return build_editor_with_sources(name, model_key, model, user_hparams=user_hparams, overrides=overrides)[0]


def build_editor_with_sources(
    name: str,
    model_key: str | tuple[str, ...],
    model: Any,
    *,
    user_hparams: UserFiles | Mapping[str, Any] = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[Any, dict[str, str]]:
    """:func:`build_editor`, and where each hyper-parameter it was given came from: key -> the label of the last
    layer that set it (a built-in file, ``editors/hparams/rome/gpt2-xl.json``; a user file by the path given;
    :data:`editors.hparams.OVERRIDES_LABEL` for a mapping or overrides). A key no layer set holds the editor's own
    default and is not listed."""
    schema = schema_for(name)
    if schema is None:
        _factory(name)  # unknown names fail here, before any file is read
        merged, sources = third_party_hparams(user_hparams, overrides)
        return get_editor(name, merged), sources
    family = _family_name(model)
    if isinstance(user_hparams, Mapping):
        # a mapping from the caller is an override layer of its own, checked like the others
        layered = layer_hparams(name, model_key, overrides={**user_hparams, **(overrides or {})}, family=family)
    else:
        layered = layer_hparams(name, model_key, user_file=user_hparams, overrides=overrides, family=family)
    # a layer that does not fit the model names the file (or the overrides) that set it
    layers_from = layered.sources.get(schema.layer_key)
    source = f"{schema.layer_key} from {layers_from}" if layers_from else ""
    editor = get_editor(name, resolve_hparams_layers(name, dict(layered.values), model, source=source))
    return editor, dict(layered.sources)


def _family_name(model: Any) -> str | None:
    from editors.families import UnsupportedArchitectureError, family_for_model_type

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return family_for_model_type(model_type).name
    except UnsupportedArchitectureError:
        return None
