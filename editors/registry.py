"""Editors by name: the built-ins plus whatever installed packages register.

A third-party package registers an editor by declaring an entry point in the group
``pytest_editsafety.editors``; the entry point loads a factory ``factory(hparams: Mapping[str, Any]) -> Editor``::

    [project.entry-points."pytest_editsafety.editors"]
    my-editor = "my_package:make_editor"

Entry points are read on every call (a directory scan, cheap next to any edit), so there is no
process-global registry to go stale or leak between tests. A third-party name equal to a built-in one, or
registered by two distributions, is an error naming the distributions.

This module imports neither torch nor the editors at import time; factories import them when called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from types import MappingProxyType
from typing import Any

from editors.hparams import (
    HparamsError,
    hparams_from_mapping,
    load_hparams,
    read_hparams_file,
    resolve_hparams_layers,
    schema_for,
)

__all__ = [
    "BUILTIN_EDITORS",
    "ENTRY_POINT_GROUP",
    "EditorFactoryError",
    "EditorNameClashError",
    "EditorRegistryError",
    "UnknownEditorError",
    "available_editors",
    "build_editor",
    "get_editor",
]


ENTRY_POINT_GROUP = "pytest_editsafety.editors"
Factory = Callable[..., Any]


class EditorRegistryError(ValueError):
    """Something is wrong with the set of registered editors (names the distribution at fault)."""


class EditorNameClashError(EditorRegistryError):
    pass


class EditorFactoryError(EditorRegistryError):
    """An entry point that does not load, or a factory that does not return an Editor."""


class UnknownEditorError(ValueError):
    """No editor of that name; the message lists the available ones."""


def _rome_variant(name: str, consistent: bool, test_prefix: bool) -> Factory:
    def factory(hparams: Mapping[str, Any], **kwargs: Any):
        from editors.rome import RomeEditor, RomeHparams

        hp = hparams_from_mapping(RomeHparams, hparams, source=f"{name} hparams")
        return RomeEditor(name, hp, consistent=consistent, test_prefix=test_prefix, **kwargs)

    factory.__qualname__ = factory.__name__ = f"make_{name.replace('-', '_')}"
    return factory


def _make_memit(hparams: Mapping[str, Any], **kwargs: Any):
    from editors.memit import MemitEditor, MemitHparams

    return MemitEditor(hparams_from_mapping(MemitHparams, hparams, source="memit hparams"), **kwargs)


def _make_ft_linf(hparams: Mapping[str, Any], **kwargs: Any):
    from editors.ft import FtHparams, FtLinfEditor

    return FtLinfEditor(hparams_from_mapping(FtHparams, hparams, source="ft-linf hparams"), **kwargs)


def _make_mend(hparams: Mapping[str, Any], **kwargs: Any):
    from editors.mend import MendEditor, MendHparams

    return MendEditor(hparams_from_mapping(MendHparams, hparams, source="mend hparams"), **kwargs)


# Original ROME keys its update on the bare prompt; C-ROME on the mean over templates; C-ROME + prefix also
# asks the harness to prepend an edit-time prefix to hard cases' test prompts.
BUILTIN_EDITORS: Mapping[str, Factory] = MappingProxyType({
    "rome": _rome_variant("rome", consistent=False, test_prefix=False),
    "c-rome": _rome_variant("c-rome", consistent=True, test_prefix=False),
    "c-rome-prefix": _rome_variant("c-rome-prefix", consistent=True, test_prefix=True),
    "memit": _make_memit,
    "ft-linf": _make_ft_linf,
    "mend": _make_mend,
})


def _dist_name(ep: metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown distribution>"


def _third_party() -> dict[str, metadata.EntryPoint]:
    """Entry points of the group by name, after checking that no name is taken twice."""
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN_EDITORS:
            raise EditorNameClashError(
                f"distribution {_dist_name(ep)!r} registers editor {ep.name!r} (entry point {ep.value!r} in group "
                f"{ENTRY_POINT_GROUP!r}), a name taken by a built-in editor; rename it"
            )
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


def available_editors() -> tuple[str, ...]:
    """Built-in editor names, in their fixed order, then the installed third-party ones, sorted."""
    return tuple(BUILTIN_EDITORS) + tuple(sorted(_third_party()))


def _factory(name: str) -> tuple[Factory, str]:
    """The factory for ``name`` and a description of where it came from (for error messages)."""
    third_party = _third_party()  # checked even for built-ins, so a clash is never silently shadowed
    if name in BUILTIN_EDITORS:
        return BUILTIN_EDITORS[name], "built-in"
    ep = third_party.get(name)
    if ep is None:
        raise UnknownEditorError(
            f"unknown editor {name!r}; available: {', '.join(tuple(BUILTIN_EDITORS) + tuple(sorted(third_party)))}"
        )
    where = f"entry point {ep.name!r} = {ep.value!r} of distribution {_dist_name(ep)!r}"
    try:
        factory = ep.load()
    except Exception as err:  # any import-time failure of a plugin is reported with its origin
        raise EditorFactoryError(f"{where}: cannot load: {type(err).__name__}: {err}") from err
    if not callable(factory):
        raise EditorFactoryError(f"{where}: loads {factory!r}, which is not callable")
    return factory, where


def get_editor(name: str, hparams: Mapping[str, Any] | None = None, **kwargs: Any):
    """A new editor ``name`` built by its factory from ``hparams`` (layers already resolved).

    ``kwargs`` go to the factory as keywords: the built-ins take ``context_templates``, and ROME's
    ``covariance`` or MEMIT's ``covariance_provider``; a third-party factory gets them only when given.
    """
    from editors.base import Editor

    factory, where = _factory(name)
    try:
        editor = factory(dict(hparams or {}), **kwargs)
    except HparamsError:
        raise
    except TypeError as err:
        raise EditorFactoryError(f"editor {name!r} ({where}): factory call failed: {err}") from err
    if not isinstance(editor, Editor):
        raise EditorFactoryError(
            f"editor {name!r} ({where}): factory returned {type(editor).__name__}, which lacks the Editor "
            "protocol (a 'name' attribute, apply() and parameters_touched())"
        )
    return editor


def build_editor(
    name: str,
    model_key: str,
    model: Any,
    *,
    user_hparams: str | Path | Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
    **kwargs: Any,
):
    """The editor ``name`` configured for ``model`` (known to the user as ``model_key``).

    Built-ins read their hparams with :func:`editors.hparams.load_hparams` (built-in file for the model or its
    family, then ``user_hparams``, a JSON file or a mapping, then ``overrides``) and resolve symbolic layers
    (``"causal"``) against ``model.config``. A third-party editor gets ``user_hparams`` then ``overrides``
    as they are.
    """
    schema = schema_for(name)
    if schema is None:
        _factory(name)  # unknown names fail here, before any file is read
        merged: dict[str, Any] = {}
        if isinstance(user_hparams, Mapping):
            merged.update(user_hparams)
        elif user_hparams is not None:
            merged.update(read_hparams_file(Path(user_hparams)))
        merged.update(overrides or {})
        merged.pop("_comment", None)
        return get_editor(name, merged, **kwargs)
    family = _family_name(model)
    if isinstance(user_hparams, Mapping):
        # a mapping from the caller is an override layer of its own, checked like the others
        hparams = load_hparams(name, model_key, overrides={**user_hparams, **(overrides or {})}, family=family)
    else:
        hparams = load_hparams(name, model_key, user_file=user_hparams, overrides=overrides, family=family)
    return get_editor(name, resolve_hparams_layers(name, hparams, model), **kwargs)


def _family_name(model: Any) -> str | None:
    from pytest_editsafety.families import UnsupportedArchitectureError, family_for_model_type

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        return family_for_model_type(model_type).name
    except UnsupportedArchitectureError:
        return None
