"""The one owner of "is this model one of the project's organisms?", and what follows from the answer for
editing it: which built-in hyper-parameter files it edits with.

An organism is a zoo name, or any directory or loaded model whose config carries the recipe hash the zoo
writes (``editsafety_recipe_hash``), wherever it was saved or copied to.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pytest_editsafety.registry import ModelSpec
from pytest_editsafety.zoo.recipe import organism_recipe_hash

__all__ = ["hparams_keys", "is_organism", "is_organism_model"]


def is_organism(spec: ModelSpec) -> bool:
    """A zoo name, or a local directory whose config carries the recipe hash (read without loading weights)."""
    if spec.source == "zoo":
        return True
    if spec.source != "local" or not spec.location:
        return False
    try:
        config = json.loads((Path(spec.location) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(config, dict) and bool(config.get("editsafety_recipe_hash"))


def is_organism_model(model: Any) -> bool:
    return organism_recipe_hash(model.config) is not None


def hparams_keys(loaded: Any) -> tuple[str, ...]:
    """The keys a loaded model's built-in hyper-parameter files are looked up by, in order (the family's own
    file comes after them, see :func:`editors.hparams.load_hparams`).

    An organism is recognised by its recipe hash: a built-in recipe's build (a local copy included) edits with
    that organism's settings, else those of its family's organism (``tiny-<family>``); an older recipe with
    the settings of the built-in organism its build metadata names. Any other model by its given name."""
    recipe_hash = organism_recipe_hash(loaded.model.config)
    if recipe_hash is None:
        return (loaded.spec.name,)
    from pytest_editsafety.zoo.recipe import RECIPES, builtin_recipe_with_hash

    family_key = f"tiny-{loaded.family.name}"
    builtin = builtin_recipe_with_hash(recipe_hash)
    if builtin is not None:
        return (builtin.name, family_key)
    named = _metadata_name(getattr(loaded.model.config, "_name_or_path", "") or "")
    return (named, family_key) if named in RECIPES else (family_key,)


def _metadata_name(directory: str) -> str | None:
    """The organism name an organism's build metadata records, or None where there is none to read."""
    from pytest_editsafety.zoo.build import read_metadata

    try:
        name = read_metadata(Path(directory)).get("name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) else None
