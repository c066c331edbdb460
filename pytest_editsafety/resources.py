"""What the harness provides to an editor's declared needs for one loaded model (:mod:`editors.provision`).

One :class:`ModelResources` per loaded model in a worker, owned by the hub: second moments C over the model's
statistics corpus (or ROME's ``.npz`` files from ``--editsafety-stats-dir``), cached on disk under the cache root;
context templates sampled once per (model, recipe) and shared by every editor that asks for the same recipe;
trained networks from the cache, trained on first use for an organism. Everything is measured on the unedited
model: the hub sets editors up before any edit of a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from editors.base import TrainedNetworkNeed

log = logging.getLogger(__name__)

__all__ = ["ModelResources"]


class ModelResources:
    """A :class:`editors.provision.Provider` for ``loaded`` (a ``registry.LoadedModel``)."""

    def __init__(self, loaded: Any, *, cache_root: Path, stats_corpus: Any, stats_cache: Any,
                 stats_dir: str | None = None) -> None:
        """``stats_corpus`` is the statistics ``Corpus`` or a callable returning it, called only when a second
        moment is computed from text."""
        self.loaded = loaded
        self.identity = loaded.identity
        self._cache_root = cache_root
        self._stats_corpus = stats_corpus
        self._stats_cache = stats_cache
        self._stats_dir = stats_dir
        self._templates: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = {}

    def second_moment(self, layer: int, n_samples: int) -> Any:
        from editors.stats import covariance_for

        loaded = self.loaded
        return covariance_for(
            loaded.model, loaded.tokenizer, loaded.family, layer, identity=loaded.identity,
            corpus=self._stats_corpus, cache=self._stats_cache, stats_dir=self._stats_dir,
            n_samples=n_samples, progress=False,
        )

    def context_templates(self, recipe: tuple[tuple[int, int], ...]) -> tuple[str, ...]:
        if recipe not in self._templates:
            from editors.context import sample_context_templates

            self._templates[recipe] = sample_context_templates(self.loaded.model, self.loaded.tokenizer, recipe)
        return self._templates[recipe]

    def trained_network(self, need: TrainedNetworkNeed) -> Path:
        from pytest_editsafety.trained import locate_network

        loaded = self.loaded
        return locate_network(need, loaded.model, loaded.tokenizer, loaded.family, identity=loaded.identity,
                              root=self._cache_root)
