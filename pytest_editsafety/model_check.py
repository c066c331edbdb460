"""Before a run starts: can each of its models be loaded? Checked cheaply, without loading any weights.

A model that cannot load would otherwise be found by its first test, on every worker, after collection; a
run whose only model is a typo'd hub id or a truncated copy would end as N errored tests. These checks read
what a load would read first (config.json, the tokenizer files, the safetensors headers, the hub cache's
index) and say what is wrong with the model and how to provide it. They cannot promise a load succeeds (the
weights may not fit in memory); they catch what can be known in milliseconds. Organisms are built (and their
weights verified) on first use, so they pass here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_editsafety.registry import (
    LoadOptions,
    ModelSpec,
    ModelUnavailableError,
    check_local_directory,
    hub_cache_dir,
    offline_env,
    unavailable_message,
)

log = logging.getLogger(__name__)

__all__ = ["check_loadable", "unloadable_models"]


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
