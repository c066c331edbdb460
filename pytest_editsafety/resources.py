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
                 ordinary_texts: Callable[[], Sequence[str]] = tuple, weights_pinned: bool = True,
                 progress: Callable[[str], None] = lambda line: None) -> None:
        """``stats_corpus`` is the statistics ``Corpus`` or a callable returning it, called only when a second
        moment is computed from text; ``values_root`` keeps the context templates across processes (None: sampled
        in each, for a model whose identity does not pin its weights); ``ordinary_texts`` returns the model's
        perplexity corpus's texts, read when an editor asks for ordinary text. ``weights_pinned`` False (a model
        the caller holds in memory, a hub model at an unpinned revision): the identity names where the weights
        came from, not what they are now, so C is kept under it plus a digest of the weights
        (:meth:`weights_identity`). ``progress`` takes a line every few seconds while C is computed."""
        self.loaded = loaded
        self._progress = progress
        self.identity = loaded.identity
        self._cache_root = cache_root
        self._values_root = values_root
        self._stats_corpus = stats_corpus
        self._stats_cache = stats_cache
        self._stats_dir = stats_dir
        self._templates: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = {}
        self._ordinary_texts = ordinary_texts
        self._weights_pinned = weights_pinned
        self._weights_identity: str | None = None
        # layer -> where its C came from (a ROME statistics file, or a corpus and the texts and keys behind it), for
        # the certificate; filled as editors ask for C. Several when editors ask for different sample sizes
        self.second_moment_sources: dict[int, list[str]] = {}

    def weights_identity(self) -> str:
        """The identity C is kept under on disk: the model's own where it pins the weights, else it plus a digest
        of every parameter and buffer, taken once (on the unedited model: editors are set up before any edit). A
        fine-tuned or edited copy of a model held in memory so never gets the C its original was given; the price
        is one pass over the weights (about 0.5 s per 124M parameters on one CPU thread) when such a model first
        needs C."""
        if self._weights_identity is None:
            if self._weights_pinned:
                self._weights_identity = self.loaded.identity
            else:
                from editors.restore import model_digest

                log.info("model %s: digesting its weights to key its second moments (its identity does not pin "
                         "them)", self.loaded.spec.name)
                self._weights_identity = f"{self.loaded.identity}+weights-{model_digest(self.loaded.model)[:16]}"
        return self._weights_identity

    def second_moment(self, layer: int, n_samples: int) -> Any:
        from editors.stats import covariance_for

        loaded = self.loaded
        return covariance_for(
            loaded.model, loaded.tokenizer, loaded.family, layer, identity=self.weights_identity(),
            corpus=self._stats_corpus, cache=self._stats_cache, stats_dir=self._stats_dir,
            n_samples=n_samples, progress=self._progress,
            described=lambda source: self._second_moment_source(layer, source),
        )

    def _second_moment_source(self, layer: int, source: str) -> None:
        sources = self.second_moment_sources.setdefault(layer, [])
        if source not in sources:
            sources.append(source)

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
        # under the model's own identity, as `editsafety train --editor mend` writes it and MEND's set-up checks it
        # (Provided.identity): a network is trained for a model, and a caller who changed the weights in memory
        # trains one for the new weights (or passes its archive)
        return locate_network(need, loaded.model, loaded.tokenizer, loaded.family, identity=loaded.identity,
                              root=self._cache_root)

    def ordinary_texts(self) -> tuple[str, ...]:
        return tuple(self._ordinary_texts())
