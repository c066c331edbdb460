"""Before a run starts: can each of its models be loaded? Checked cheaply, without loading any weights.

A model that cannot load would otherwise be found by its first test, on every worker, after collection; a
run whose only model is a typo'd hub id or a truncated copy would end as N errored tests. These checks read
what a load would read first (config.json, the tokenizer files, the safetensors headers, the hub cache's
index) and say what is wrong with the model and how to provide it. They cannot promise a load succeeds (the
weights may not fit in memory); they catch what can be known in milliseconds. Organisms are built (and their
weights verified) on first use, so they pass here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_editsafety.registry import (
    LoadOptions,
    ModelSpec,
    PUBLISHED_DEPTHS,
    ModelUnavailableError,
    check_local_directory,
    hub_cache_dir,
    offline_env,
    unavailable_message,
)

log = logging.getLogger(__name__)

__all__ = ["check_loadable", "hparams_lookup_keys", "known_config", "layer_problems", "unloadable_models"]


def _hub_config_cached(spec: ModelSpec, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.location, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    return isinstance(found, str)


def check_loadable(spec: ModelSpec, options: LoadOptions | None = None) -> None:
    """Raise what loading ``spec`` is certain to raise (``ModelUnavailableError`` and kin, naming the model and
    the file); return when nothing that can be checked without loading stands in the way."""
    options = options or LoadOptions()
    if spec.source == "local":
        check_local_directory(spec)
    elif spec.source == "hub":
        local_only = options.local_files_only if options.local_files_only is not None else offline_env()
        # online, the load itself fetches what is missing; offline, the cache must already hold the model
        if local_only:
            revision = options.revision or spec.revision
            if not _hub_config_cached(spec, revision):
                raise ModelUnavailableError(unavailable_message(
                    spec, "config", FileNotFoundError("config.json is not in the local Hugging Face cache and "
                                                      "the hub may not be contacted (offline)"), revision))


def unloadable_models(choices: Iterable[Any], options: LoadOptions | None = None) -> Mapping[str, str]:
    """``{slug: why}`` for the plan's models (``plan.ModelChoice``) that :func:`check_loadable` refuses."""
    problems: dict[str, str] = {}
    for choice in choices:
        try:
            check_loadable(choice.spec, options)
        except (ModelUnavailableError, ValueError) as err:
            problems[choice.slug] = str(err)
    return problems


# where known_config says a built-in hub model's depth came from, when its config.json is not at hand
PUBLISHED_CONFIG = "published config"


def config_is_complete(source: str) -> bool:
    """Whether the config :func:`known_config` read at ``source`` judges every layer form: the model's own
    config.json or a built-in model's published depth, not an unbuilt organism's recipe (whose causal layer the
    build measures)."""
    return source.endswith("config.json") or source.startswith(PUBLISHED_CONFIG)


def known_config(spec: ModelSpec, cache: str | None) -> tuple[dict[str, Any] | None, str, list[str]]:
    """What can be known of ``spec``'s config without loading or downloading anything: (config or None, where it
    was read, notes). Organisms: their build's config.json (none before the build, but the recipe's depth and
    hash); local directories: config.json; Hugging Face ids: config.json if the local cache holds it, else for a
    built-in model the published depth (:data:`pytest_editsafety.registry.PUBLISHED_DEPTHS`)."""

    def read(path: Path) -> dict[str, Any]:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return data

    if spec.source == "local":
        path = Path(spec.location) / "config.json"
        return read(path), str(path), []
    if spec.source == "zoo":
        from pytest_editsafety.cache import cache_root
        from pytest_editsafety.zoo.build import organism_dir, recipe_for

        recipe = recipe_for(spec.location)
        path = organism_dir(recipe, cache_root(cache)) / "config.json"
        if path.is_file():
            return read(path), str(path), []
        partial = {"n_layer": recipe.shape.n_layer, "editsafety_recipe_hash": recipe.recipe_hash}
        return partial, f"recipe {recipe.name} ({recipe.recipe_hash})", [
            f"organism {recipe.name!r} is not built under {path.parent.parent}: its depth ({recipe.shape.n_layer} "
            f"layers) comes from its recipe; its causal layer is measured by the build "
            f"(python -m pytest_editsafety zoo build {recipe.name})"]
    try:  # the hub: the local cache only, never the network
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec.location, "config.json", cache_dir=hub_cache_dir(),
                                       revision=spec.revision)
    except Exception as err:  # best effort: no cache, no huggingface_hub, a malformed cache entry
        found = None
        log.debug("no cached config for %s: %s", spec.location, err)
    if isinstance(found, str):
        return read(Path(found)), found, []
    depth = PUBLISHED_DEPTHS.get(spec.location)
    if depth is not None and spec.family:
        from editors.families import FAMILIES

        family = FAMILIES[spec.family]
        return ({"model_type": family.model_types[0], family.n_layers_attr: depth},
                f"{PUBLISHED_CONFIG} of {spec.location} ({depth} layers)",
                [f"config.json of {spec.location} is not in the local Hugging Face cache (nothing is downloaded): "
                 f"layers are resolved and checked against its published depth, {depth} layers"])
    return None, "", [f"config.json of {spec.location} is not in the local Hugging Face cache (nothing is "
                      "downloaded): layers are not checked against the model's depth"]


def hparams_lookup_keys(spec: ModelSpec, config: Mapping[str, Any] | None, family: str | None) -> tuple[str, ...]:
    """The keys ``spec``'s built-in hyper-parameter files are looked up by (``organisms.hparams_keys``), from its
    config as :func:`known_config` reads it."""
    from types import SimpleNamespace

    from pytest_editsafety.organisms import hparams_keys

    # a saved config may hold _name_or_path already: the spec's location is the one the lookup goes by
    view = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(**{**(config or {}),
                                                                           "_name_or_path": spec.location})),
                           family=SimpleNamespace(name=family), spec=spec)
    return hparams_keys(view)


def layer_problems(choices: Iterable[Any], editors: Iterable[str], user_files: Mapping[str, Any],
                   cache: str | None) -> list[str]:
    """Each (editor, model) whose layer setting the model's config, read without loading anything, shows to be
    out of range, as a sentence naming the file that set it and how to set another. Best effort: models whose
    config is not at hand (an uncached hub id, an organism not built yet), editors without built-in
    hyper-parameters and anything else this cannot read are left to their tests, which name it. ``user_files``:
    editor -> its --editsafety-hparams files and named sets, in order."""
    problems: list[str] = []
    editors = tuple(editors)
    for choice in choices:
        try:
            problems += _layer_problems(choice, editors, user_files, cache)
        except Exception as err:
            log.debug("layer check of %s skipped: %s: %s", choice.given, type(err).__name__, err)
    return problems


def _layer_problems(choice: Any, editors: tuple[str, ...], user_files: Mapping[str, Any], cache: str | None
                    ) -> list[str]:
    from types import SimpleNamespace

    from editors.families import family_for_model_type
    from editors.hparams import HparamsError, layer_setting, resolve_layers, schema_for

    spec = choice.spec
    config, source, _ = known_config(spec, cache)
    if config is None or not config_is_complete(source):
        return []
    family = spec.family or family_for_model_type(config["model_type"]).name
    keys = hparams_lookup_keys(spec, config, family)
    try:  # a config whose depth or causal layer cannot be read judges no layer (its tests will say why)
        resolve_layers("causal", SimpleNamespace(**config))
    except HparamsError as err:
        log.debug("layer check of %s skipped: %s", choice.given, err)
        return []
    problems: list[str] = []
    for editor in editors:
        schema = schema_for(editor)
        if schema is None:
            continue
        try:
            value, label = layer_setting(editor, keys, user_file=user_files.get(editor), family=family)
        except Exception as err:  # e.g. no built-in file for this editor on this family: its tests name it
            log.debug("layer check of %s on %s skipped: %s: %s", editor, choice.given, type(err).__name__, err)
            continue
        try:
            resolve_layers(value, SimpleNamespace(**config), source=f"layer from {label}")
        except HparamsError as err:  # out of range, or a form no model takes ('48/48')
            example = f'{{"{schema.layer_key}": ' + ("[N]}" if schema.many_layers else "N}")
            problems.append(f"{editor} on {choice.given}: {err}; set the layer with --editsafety-hparams "
                            f"{editor}=FILE (a JSON file such as {example}; python -m pytest_editsafety hparams "
                            f"--model {choice.given} --editor {editor} shows every value and its source)")
    return problems
