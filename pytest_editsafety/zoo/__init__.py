"""The model organism: tiny GPT-2, GPT-J and Llama models trained by the project on its own world."""

from __future__ import annotations

from pytest_editsafety.zoo.build import ensure_built, organism_dir, organism_world, read_metadata, recipe_for
from pytest_editsafety.zoo.recipe import DEFAULT_BUILD, RECIPES

__all__ = ["DEFAULT_BUILD", "RECIPES", "ensure_built", "organism_dir", "organism_world", "read_metadata", "recipe_for"]
