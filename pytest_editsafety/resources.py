"""What the harness provides to an editor's declared needs for one loaded model (:mod:`editors.provision`).

One :class:`ModelResources` per loaded model in a worker, owned by the hub: second moments C over the model's
statistics corpus (or ROME's ``.npz`` files from ``--editsafety-stats-dir``), cached on disk under the cache root;
context templates sampled once per (model, recipe) and shared by every editor that asks for the same recipe;
trained networks from the cache, trained on first use for an organism. Everything is measured on the unedited
model: the hub sets editors up before any edit of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from editors.base import TrainedNetworkNeed

log = logging.getLogger(__name__)

__all__ = ["ModelResources", "TEMPLATES_CACHE_FORMAT"]

TEMPLATES_CACHE_FORMAT = "pytest-editsafety/context-templates/1"


class ModelResources:
    """A :class:`editors.provision.Provider` for ``loaded`` (a ``registry.LoadedModel``)."""

    def __init__(self, loaded: Any, *, cache_root: Path, stats_corpus: Any, stats_cache: Any,
                 stats_dir: str | None = None, values_root: Path | None = None,
                 ordinary_texts: Callable[[], Sequence[str]] = tuple) -> None:
        """``stats_corpus`` is the statistics ``Corpus`` or a callable returning it, called only when a second
        moment is computed from text; ``values_root`` keeps the context templates across processes (None: sampled
        in each, for a model whose identity does not pin its weights); ``ordinary_texts`` returns the model's
        perplexity corpus's texts, read when an editor asks for ordinary text."""
        self.loaded = loaded
        self.identity = loaded.identity
        self._cache_root = cache_root
        self._values_root = values_root
        self._stats_corpus = stats_corpus
        self._stats_cache = stats_cache
        self._stats_dir = stats_dir
        self._templates: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = {}
        self._ordinary_texts = ordinary_texts

    def second_moment(self, layer: int, n_samples: int) -> Any:
        from editors.stats import covariance_for

        loaded = self.loaded
        return covariance_for(
            loaded.model, loaded.tokenizer, loaded.family, layer, identity=loaded.identity,
            corpus=self._stats_corpus, cache=self._stats_cache, stats_dir=self._stats_dir,
            n_samples=n_samples, progress=False,
        )

    def context_templates(self, recipe: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
        """The model's templates for ``recipe``: sampled once (half a second on the organism, every worker) and kept
        under the cache root, keyed by the weights, their dtype and device kind and the sampler's settings."""
        if recipe not in self._templates:
            from editors.context import SAMPLER_SETTINGS, sample_context_templates
            from pytest_editsafety.keyed_cache import cached_value, weights_key

            loaded = self.loaded
            key = {"format": TEMPLATES_CACHE_FORMAT, **weights_key(loaded), "recipe": [list(pair) for pair in recipe],
                   **SAMPLER_SETTINGS}
            templates = cached_value(
                self._values_root, "templates", loaded.spec.name, key,
                lambda: list(sample_context_templates(loaded.model, loaded.tokenizer, recipe)),
                valid=lambda value: isinstance(value, list) and bool(value) and all(isinstance(t, str) and
                                                                                    t.count("{}") == 1 for t in value))
            self._templates[recipe] = tuple(templates)
        return self._templates[recipe]

    def trained_network(self, need: TrainedNetworkNeed) -> Path:
        from pytest_editsafety.trained import locate_network

        loaded = self.loaded
        return locate_network(need, loaded.model, loaded.tokenizer, loaded.family, identity=loaded.identity,
                              root=self._cache_root)

    def ordinary_texts(self) -> tuple[str, ...]:
        return tuple(self._ordinary_texts())
